r"""The text-conditioned image prior over a trained MedUnifier's two code grids (DESIGN.md 1.4).

A bidirectional transformer over [top codes; bottom codes] that cross-attends to the frozen
Q-Former's text states, trained by masked-code prediction on the project's training engine
(`medunifier_jax/prior/`), sampled by parallel decoding with classifier-free guidance.

Variants (the config's own argument selects one):
  paper  8x8 + 16x16 codes, K=512, Q-Former width 768 (configs/pretrain.py:paper); width 512,
         12 blocks, 8 heads, batch 256: a few hours on one accelerator.
  demo   the demo MedUnifier's 4x4 + 8x8x2 codes (K=512, two per bottom cell); width 128,
         3 blocks, 400 steps of 32 on the first 8192 training pairs: a few minutes on 2 CPU
         cores.
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
`model.bottom_depth`, `model.text_width` and `text_encoder` are copied from the MedUnifier run
at start (until then they hold the values of the pre-training variant of the same name, which
serve runs without one, e.g. tests).
"""

from pathlib import Path

import ml_collections

from medunifier_jax import config_lib

# The pre-training config: the prior trains on its engine and reads its model's code grids.
pretrain = config_lib.load_module(Path(__file__).with_name("pretrain.py"))

# Each variant is one table: the dotted fields it changes from the defaults below.
VARIANTS = {
  "paper": {"compute_dtype": "bfloat16", "model.scan_layers": True},
  "demo": {
    # ~0.5 s per step of 32 on 2 CPU cores shared with other work (4 blocks with a 512-wide
    # MLP at batch 64 took 2 s).
    "model.width": 128,
    "model.depth": 3,
    "model.num_heads": 4,
    "model.mlp_dim": 256,
    "model.null_length": 4,
    # A few minutes after the demo's pre-training: codes of the first 8192 training pairs
    # (about half a minute to extract), 400 steps of 32. 800 steps (at 3e-3, guidance 1)
    # reached a loss of 2.66 against 2.74 and a finding fidelity of 0.770 / 0.778 against
    # 0.765 / 0.764 on 500 validation images (two seeds), but would take the demo past 20
    # minutes (README, "What limits the reconstructions' finding fidelity").
    "codes.max_examples": 8192,
    "batch_size": 32,
    "num_steps": 400,
    # Chosen on 500 validation reports (README, "What limits the reconstructions' finding
    # fidelity"): with guidance 1, finding fidelity 0.746 / 0.755 / 0.765 / 0.755 at 1e-3 /
    # 2e-3 / 3e-3 / 5e-3.
    "learning_rate": 3e-3,
    # Sampling, chosen on the same 500 validation reports (README, "What limits the
    # reconstructions' finding fidelity"), mean finding AUC over two seeds: temperature 1 / 0.8
    # 0.765 / 0.774; at 0.8 the best of 1 / 2 / 3 / 4 drafts by the MedUnifier's ITM head
    # 0.774 / 0.786 / 0.790 / 0.787. Two drafts double the sampling time of an image.
    "sample.temperature": 0.8,
    "sample.candidates": 2,
    "warmup_steps": 40,
    "weight_decay": 0.01,
    "checkpoint_every": 200,
    "log_every": 20,
  },
  "tiny": {
    "model.width": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "model.dropout": 0.0,
    "model.null_length": 4,
    "codes.cache_text_states": True,
    "codes.shard_size": 64,
    "codes.batch_size": 16,
    "batch_size": 8,
    "num_steps": 20,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "weight_decay": 0.0,
    "checkpoint_every": 10,
    "log_every": 5,
  },
}


def _model(medunifier: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The prior; `medunifier` is the MedUnifier's `config.model` whose codes it models."""
  m = ml_collections.ConfigDict()
  # Dictated by the frozen MedUnifier (filled from its run config when training starts).
  m.grid = medunifier.vqvae.grid  # bottom grid g; the top grid is g/2
  m.codebook_size = medunifier.vqvae.codebook_size  # K, both levels
  m.bottom_depth = medunifier.vqvae.bottom_depth  # R codes per bottom cell
  m.text_width = medunifier.qformer.hidden_size  # Q-Former hidden size
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
  # One lax.scan over the blocks (and the text encoder's layers): each compiled once
  # (models/stack.py); off, as before to the bit.
  m.scan_layers = False
  # Trained by nobody: the frozen Q-Former the step runs when text states are not cached.
  m.frozen_paths = ("text_encoder",)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = config_lib.select_variant(arg, VARIANTS, default="demo")
  c = ml_collections.ConfigDict()
  c.task = "prior"  # medunifier_jax/train.py sends this config to prior.train.train_prior
  c.variant = variant
  # Pre-training's engine settings but for the schedule, the checkpoint and log intervals.
  c.update(
    pretrain.engine_fields(
      batch_size=256,
      num_steps=50000,
      learning_rate=4e-4,
      end_learning_rate=1e-6,
      warmup_steps=2000,
      adam_b2=0.96,
      checkpoint_every=2000,
      log_every=100,
    )
  )
  c.model = _model(pretrain.get_config(variant).model)

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
  k.cache_text_states = False
  k.shard_size = 4096  # examples per shard file
  k.batch_size = 64  # examples per model call while extracting
  k.max_examples = 0  # > 0: only the first that many training examples
  k.shuffle_seed = 0

  # Parallel decoding (medunifier_jax/prior/sample.py): defaults of Model.generate_images.
  s = c.sample = ml_collections.ConfigDict()
  s.steps = 12
  # logits = cond + guidance * (cond - uncond); 0: conditional only. Chosen on the demo's 500
  # validation reports (prior at 3e-3): finding fidelity 0.765 at 1, 0.760 at 1.5, 0.741 at 2,
  # 0.712 at 3 (a stronger weight washes out edema: its AUC falls from 0.93 to 0.57).
  s.guidance = 1.0
  s.temperature = 1.0  # of the code sampling
  s.choice_temperature = 4.5  # Gumbel noise on the confidences, annealed to 0 over the steps
  # Drafts per image: the MedUnifier's image-text matching head keeps the one that matches its
  # report best (best of k; 1: the first draw). Text-conditioned samples only.
  s.candidates = 1

  # What the step reads from a batch ("text_states" is added when the states are cached).
  c.batch_keys = ("codes_top", "codes_bottom", "input_ids", "attention_mask")
  c.init_from = ""  # unused: the frozen text encoder comes from medunifier_workdir

  config_lib.override(c, VARIANTS[variant])
  config_lib.derive(c)
  c.lock()
  return c
