r"""The text-conditioned image prior over a trained MedUnifier's two code grids (DESIGN.md 1.4).

A bidirectional transformer over [top codes; bottom codes] that cross-attends to the frozen
Q-Former's text states, trained by masked-code prediction on the project's training engine
(`medunifier_jax/prior/`), sampled by parallel decoding with classifier-free guidance.

Variants (the config's own argument selects one):
  paper  8x8 + 16x16 codes, K=512, Q-Former width 768 (configs/pretrain.py:paper); width 512,
         12 blocks, 8 heads, batch 256: a few hours on one accelerator.
  demo   the demo MedUnifier's 4x4 + 8x8 codes (K=512); width 128, 3 blocks, 400 steps of 32
         on the first 8192 training pairs: a few minutes on 2 CPU cores.
  tiny   the tiny MedUnifier's geometry (K=32, width 32); used by the tests.

The text states the prior attends to are computed in every step by the frozen Q-Former (paper,
demo; cached with the codes they would take ~100 GB over MIMIC-CXR at the paper's size), or
cached with the codes (tiny; `codes.cache_text_states`).

Launch, after pre-training the MedUnifier in W:
  python -m medunifier_jax.train --config configs/prior.py:demo --workdir W/prior \
      --config.medunifier_workdir=W
  python -m medunifier_jax.generate --workdir W --prompt "Large right pleural effusion." \
      --num 8 --out W/generated

The first run writes the code cache (`codes.dir`, default W/prior/codes) from the MedUnifier's
latest checkpoint; the same command resumes. `model.grid`, `model.codebook_size`,
`model.text_width` and `text_encoder` are copied from the MedUnifier run at start (the values
below match the corresponding pre-training variant and serve runs without one, e.g. tests).
"""

import ml_collections

VARIANTS = ("paper", "demo", "tiny")


def _model(variant: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # Dictated by the frozen MedUnifier (filled from its run config when training starts).
  m.grid = 16  # bottom grid g; the top grid is g/2
  m.codebook_size = 512  # K, both levels
  m.text_width = 768  # Q-Former hidden size
  # The prior itself.
  m.width = 512
  m.depth = 12
  m.num_heads = 8
  m.mlp_dim = 2048
  m.dropout = 0.1
  m.attention_dropout = 0.0
  m.layer_norm_eps = 1e-6
  m.null_length = 8  # positions of the learned null condition (at most the text length)
  m.condition = "text"  # "none": always the null condition (the original release's setting)
  m.cond_drop = 0.1  # share of training examples that see the null condition
  # Trained by nobody: the frozen Q-Former the step runs when text states are not cached.
  m.frozen_paths = ("text_encoder",)
  if variant == "demo":
    m.grid, m.text_width = 8, 128
    # ~0.5 s per step of 32 on 2 CPU cores shared with other work (4 blocks with a 512-wide
    # MLP at batch 64 took 2 s).
    m.width, m.depth, m.num_heads, m.mlp_dim = 128, 3, 4, 256
    m.null_length = 4
  elif variant == "tiny":
    m.grid, m.codebook_size, m.text_width = 8, 32, 32
    m.width, m.depth, m.num_heads, m.mlp_dim = 32, 2, 2, 64
    m.dropout = 0.0
    m.null_length = 4
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.task = "prior"  # medunifier_jax/train.py sends this config to prior.train.train_prior
  c.variant = variant
  c.seed = 0
  c.model = _model(variant)

  # The frozen MedUnifier: its workdir (latest checkpoint) and, filled in at start, its step.
  c.medunifier_workdir = ""
  c.medunifier_step = -1
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.qformer = ml_collections.ConfigDict()  # the MedUnifier's model.qformer
  c.text_encoder.vision_width = 0  # its model.vit.width (sizes unused cross-attention weights)

  # The code cache (medunifier_jax/prior/codes.py).
  k = c.codes = ml_collections.ConfigDict()
  k.dir = ""  # empty: WORKDIR/codes
  # False: the frozen Q-Former computes them in every step (a few per cent of the demo's step;
  # cached, the demo's would take 24 KB per example, the paper's 290 KB).
  k.cache_text_states = variant == "tiny"
  k.shard_size = 4096  # examples per shard file
  k.batch_size = 64  # examples per model call while extracting
  k.max_examples = 0  # > 0: only the first that many training examples
  k.shuffle_seed = 0

  # Parallel decoding (medunifier_jax/prior/sample.py): defaults of Model.generate_images.
  s = c.sample = ml_collections.ConfigDict()
  s.steps = 12
  s.guidance = 1.0  # logits = cond + guidance * (cond - uncond); 0: conditional only
  s.temperature = 1.0  # of the code sampling
  s.choice_temperature = 4.5  # Gumbel noise on the confidences, annealed to 0 over the steps

  # What the step reads from a batch ("text_states" is added when the states are cached).
  c.batch_keys = ("codes_top", "codes_bottom", "input_ids", "attention_mask")

  # Optimisation.
  c.batch_size = 256  # global
  c.num_steps = 50000
  c.learning_rate = 4e-4
  c.end_learning_rate = 1e-6
  c.warmup_steps = 2000
  c.adam_b1 = 0.9
  c.adam_b2 = 0.96
  c.weight_decay = 0.05
  c.grad_clip_norm = 1.0
  c.compute_dtype = "float32"
  c.remat = False

  c.mesh = [("data", -1), ("model", 1)]
  c.sharding_rules = [
      ("batch", "data"),
      ("embed", None),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("vocab", "model"),
      ("codebook", None),
      ("conv_in", None),
      ("conv_out", None),
  ]

  c.init_from = ""  # unused: the frozen text encoder comes from medunifier_workdir
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.log_every = 100
  c.eval_every = 0

  if variant == "paper":
    c.compute_dtype = "bfloat16"
  elif variant == "demo":
    # A few minutes after the demo's pre-training: codes of the first 8192 training pairs
    # (about half a minute to extract), 400 steps of 32.
    c.codes.max_examples = 8192
    c.batch_size = 32
    c.num_steps = 400
    c.learning_rate = 1e-3
    c.warmup_steps = 40
    c.weight_decay = 0.01
    c.checkpoint_every = 200
    c.log_every = 20
  elif variant == "tiny":
    c.batch_size = 8
    c.num_steps = 20
    c.learning_rate = 3e-3
    c.warmup_steps = 2
    c.weight_decay = 0.0
    c.checkpoint_every = 10
    c.log_every = 5
    c.codes.shard_size = 64
    c.codes.batch_size = 16
  c.lock()
  return c
