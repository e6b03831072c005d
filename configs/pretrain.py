r"""MedUnifier pre-training: ITC + ITM + ITG + TIG in one step.

Variants (the config's own argument selects one; nothing is copied between files):
  paper     EVA ViT-g/14 (frozen), BERT-base Q-Former, d=768, K=512, 224 px, 95 tokens.
  small     a reduced model that still has the paper's 16x16 patch grid (112 px, patch 7).
  demo      learns on phantom radiographs in minutes on 2 CPU cores (the README's main job).
  tiny      the smallest model that exercises every code path; used by the tests.
  bench_xs  the benchmark geometry: 112 px, patch 7, width 256, 4 layers, 4 heads, 32 queries,
            64 text tokens, vocabulary 30,524, batch 8, ViT frozen.

Launch:
  python -m medunifier_jax.train --config configs/pretrain.py:demo --workdir workdirs/demo
  python -m medunifier_jax.train --config configs/pretrain.py:paper --workdir gs://BUCKET/run \
      --config.init_from.vision=lavis-eva:/data/eva_vit_g.pth \
      --config.init_from.qformer=hf-bert:/data/cxr-bert-general \
      --config.data.tokenizer_dir=/data/cxr-bert-general

`init_from` takes one source per part of the model (`vision`, `qformer`; medunifier_jax/weights/
init_sources.py lists the kinds), or one string for the whole model
(`--config.init_from=hf-blip2:DIR`). The paper variant names the paper's sources with placeholder
paths that must be replaced: a run refuses to start with them.
"""

import ml_collections

VARIANTS = ("paper", "small", "demo", "tiny", "bench_xs")

# Geometry rules the model checks (see medunifier_jax/models/vqvae.py):
#   vit.image_size / vit.patch_size == vqvae.grid            (patch tokens read as a grid)
#   vit.image_size == (vqvae.grid - 2) * 2**k, k >= 1         (3x3 valid conv, then k x2 upsamples)
#   vqvae.query_grid[0] * vqvae.query_grid[1] == qformer.num_queries
#   len(vqvae.decoder_channels) == k - 1


def _model(variant: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  vit = m.vit = ml_collections.ConfigDict()
  qf = m.qformer = ml_collections.ConfigDict()
  vq = m.vqvae = ml_collections.ConfigDict()

  # Defaults follow the paper / BLIP-2; variants override sizes only.
  vit.image_size = 224
  vit.patch_size = 14
  vit.width = 1408
  vit.depth = 39  # EVA ViT-g has 40 blocks; BLIP-2 drops the last one.
  vit.num_heads = 16
  vit.mlp_dim = 6144
  vit.layer_norm_eps = 1e-6
  vit.qkv_bias = True
  vit.frozen = True
  vit.dropout = 0.0

  qf.hidden_size = 768
  qf.num_layers = 12
  qf.num_heads = 12
  qf.intermediate_size = 3072
  qf.cross_attention_freq = 2
  qf.num_queries = 32
  qf.vocab_size = 30523  # BERT's 30,522 + [DEC]
  qf.max_position_embeddings = 512
  qf.layer_norm_eps = 1e-12
  qf.hidden_dropout = 0.1
  qf.attention_dropout = 0.1
  qf.pad_token_id = 0
  qf.cls_token_id = 101
  qf.dec_token_id = 30522  # [DEC], appended after BERT's vocabulary

  m.embed_dim = 256  # vision_proj / text_proj output width
  m.temperature_init = 0.07
  m.temperature_min = 0.001
  m.temperature_max = 0.5
  m.max_text_len = 95

  vq.latent_dim = 768  # d
  vq.codebook_size = 512  # K, both levels
  vq.grid = 16  # bottom grid (patch grid)
  vq.query_grid = (4, 8)  # 32 query outputs read as 4x8, resized to grid // 2
  vq.num_res_layers = 3
  vq.decoder_channels = (6 * 768, 6 * 768, 3 * 768)  # after each upsample but the last (-> 3)
  vq.commitment_weight = 1.0  # mean((sg(z_q) - z_e)^2), as in the paper's code
  vq.codebook_weight = 0.5  # mean((z_q - sg(z_e))^2), as in the paper's code
  vq.batchnorm_momentum = 0.9
  vq.ema = False  # EMA codebook updates (off: the paper's behaviour)
  vq.ema_decay = 0.99
  vq.restart_dead_codes = False

  if variant == "paper":
    pass
  elif variant in ("small", "bench_xs"):
    vit.image_size, vit.patch_size = 112, 7
    vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 256, 4, 4, 1024
    qf.hidden_size, qf.num_layers, qf.num_heads, qf.intermediate_size = 256, 4, 4, 1024
    m.max_text_len = 64
    vq.latent_dim, vq.codebook_size = 128, 512
    vq.decoder_channels = (256, 128)
    if variant == "bench_xs":
      qf.vocab_size, qf.dec_token_id = 30524, 30522
    else:
      vit.frozen = False
      # A WordPiece vocabulary trained on the report corpus (set data.tokenizer_dir and the
      # BERT ids 30523/30522/101 instead to use a pretrained BERT vocabulary).
      qf.vocab_size, qf.dec_token_id, qf.cls_token_id = 8193, 8192, 2
  elif variant == "demo":
    vit.image_size, vit.patch_size = 48, 6
    # Sized so that `make demo` (pre-training + every evaluation) fits in ~20 minutes on 2 CPU
    # cores: the matching pass over 3B pairs dominates, so depth, queries and text length are cut.
    vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 128, 2, 4, 256
    vit.frozen = False
    qf.hidden_size, qf.num_layers, qf.num_heads, qf.intermediate_size = 128, 2, 4, 256
    qf.num_queries = 8
    qf.vocab_size, qf.dec_token_id = 2049, 2048  # tokenizer trained on the report corpus
    qf.cls_token_id = 2
    m.embed_dim = 128
    m.max_text_len = 48
    vq.grid, vq.query_grid = 8, (2, 4)
    # The paper's K=512 codes per level: with 128 the bottom level used every code and
    # reconstructions were 1.2 dB worse after 600 steps.
    vq.latent_dim, vq.codebook_size = 64, 512
    vq.decoder_channels = (128, 64)
    # With the paper's gradient-trained codebooks the top level collapsed to one code within a
    # few hundred steps and its loss, growing without bound, took over the clipped gradient;
    # EMA codebooks with dead-code restarts keep both levels in use.
    vq.ema, vq.restart_dead_codes = True, True
  elif variant == "tiny":
    vit.image_size, vit.patch_size = 48, 6
    vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 32, 2, 2, 64
    vit.frozen = False
    qf.hidden_size, qf.num_layers, qf.num_heads, qf.intermediate_size = 32, 2, 2, 64
    qf.num_queries = 8
    qf.max_position_embeddings = 64
    qf.vocab_size, qf.dec_token_id = 513, 512
    qf.cls_token_id = 2
    m.embed_dim = 16
    m.max_text_len = 24
    vq.grid, vq.query_grid = 8, (2, 4)
    vq.latent_dim, vq.codebook_size = 16, 32
    vq.num_res_layers = 1
    vq.decoder_channels = (32, 16)
  else:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  return m


def _evals(variant: str, max_text_len: int) -> ml_collections.ConfigDict:
  """Downstream evaluations (medunifier_jax/evaluators, DESIGN.md section 3), by entry name.

  Each entry's `task` (default: its name) picks the evaluator; `periodic` entries also run
  during training every `eval_every` steps. Defaults are the paper's protocols.
  """
  real = variant == "paper"
  e = ml_collections.ConfigDict()
  e.zero_shot = dict(
      datasets=("chexpert_5x200", "mimic_5x200", "rsna_pneumonia") if real
      else ("phantom_5x200", "phantom_pneumonia"),
      split="test",
      prompts="paper",  # "paper": the CheXpert class-prompt vocabulary; "project": our own lists
      class_set="pneumonia",  # 5x200 classes: "pneumonia" (authors' code), "gloria", "" (any)
      num_prompts=0,  # per class; 0: the vocabulary's (paper: 15 CheXpert, 10 RSNA; project: 5)
      prompt_seed=1,  # the authors' code draws from Python's random seeded with 1
      prompt_pooling="max",  # class score over its prompts' raw similarities: "max" or "mean"
      batch_size=32, itm_rescore=False, itm_batch_size=64, periodic=True)
  e.retrieval = dict(
      datasets=("mimic_5x200",) if real else ("phantom_5x200",),
      split="test", batch_size=32, ks=(1, 5, 10),
      itm_rerank_k=0,  # > 0: re-rank each query's top k with the ITM head (paper 256)
      itm_batch_size=64, periodic=True)
  e.finetune = dict(
      datasets=("rsna_pneumonia", "siim_pneumothorax", "covidx") if real
      else ("phantom_pneumonia", "phantom_pneumothorax", "phantom_covidx"),
      train_split="train", val_split="validation", test_split="test",
      # "paper": Q-Former and queries fine-tuned end to end, ViT frozen (the authors' code);
      # "linear_probe": a head on frozen, cached query outputs (cheap; not the paper's figures).
      protocol="paper",
      label_fractions=(0.01, 0.1, 1.0), learning_rate=1e-5, batch_size=8, epochs=5,
      end_learning_rate=1e-8,  # paper protocol: cosine to this over all steps (authors' code)
      schedule="cosine",  # paper protocol: "cosine" or "constant" (the probe is constant)
      adam_b1=0.9, adam_b2=0.95,  # paper protocol (the probe keeps optax's defaults)
      weight_decay=0.01,  # AdamW, as the authors' code sets it
      hidden_dim=768,  # width between the two linear layers (the authors' code)
      pooling="flatten",  # query outputs into the head: "flatten" (Q*H, authors') or "mean"
      select_metric="auc",  # on the validation split, per epoch
      feature_batch_size=32, seed=0, periodic=False)
  e.report_gen = dict(
      datasets=("mimic_cxr",) if real else ("phantom_openi",),
      split="test", train_split="train", batch_size=16, max_examples=0,
      method="beam", num_beams=3, max_length=min(95, max_text_len), min_length=3,
      length_penalty=1.0, repetition_penalty=1.0, early_stopping=False, top_p=0.9,
      temperature=1.0, seed=0, meteor=True, split_references=True,
      labeler="rule",  # clinical-efficacy reader: evaluators/labeler.py LABELERS
      baseline=True,  # also score the most frequent training report, a model-free baseline
      periodic=False)
  if not real:
    # The phantom 5x200 set renders GLoRIA's classes (Consolidation, not Pneumonia), and the
    # phantom reports use the project's phrasing: after 400 demo steps the paper vocabulary
    # scored 5x200 accuracy 0.21 (chance) where the project's scored 0.29.
    e.zero_shot.update(class_set="gloria", prompts="project")
  if variant == "demo":
    # A fresh head on a few hundred phantom features learns nothing in 5 epochs at 1e-5; the
    # probe keeps the demo within its time budget.
    e.finetune.update(protocol="linear_probe", learning_rate=1e-3, epochs=10, hidden_dim=256)
  elif variant == "tiny":
    for entry in (e.zero_shot, e.retrieval):
      entry.update(batch_size=8, periodic=False)  # tests train tiny models without evaluating
    e.finetune.update(protocol="linear_probe", label_fractions=(0.1, 1.0), learning_rate=1e-3,
                      epochs=2, hidden_dim=32, feature_batch_size=8)
    e.report_gen.update(batch_size=4, max_examples=8)
  return e


def _image_gen_eval(variant: str) -> dict:
  """The text-to-image entry (medunifier_jax/evaluators/image_gen.py, README "Drawing images
  from reports"): images the prior draws for held-out reports against real test images (FID,
  KID) beside the unconditional prior, VQ reconstructions and real training images, and finding
  fidelity read by a classifier trained on real images. Needs a trained prior (WORKDIR/prior);
  without one only the baselines are scored.
  """
  real = variant == "paper"
  e = dict(
      datasets=("mimic_cxr",) if real else ("phantom_openi",),  # the pre-training data
      split="test", train_split="train", val_split="validation",
      num_images=0,  # per set, the first of each split (0: the whole test split)
      batch_size=32,  # reports per generation / reconstruction / Inception call
      prior_dir="",  # the text prior; "": WORKDIR/prior
      uncond_prior_dir="",  # condition="none" prior; "": WORKDIR/prior_uncond, else null condition
      sample_steps=12, guidance=1.0, temperature=1.0, seed=0,  # fixed: never tuned on test
      inception_cache="",  # converted FID Inception weights; "": ~/.cache/medunifier_jax/...
      kid_subsets=100, kid_subset_size=1000,
      classifier_dir="",  # cached fidelity classifier; "": WORKDIR/eval/fidelity_classifier
      classifier_steps=5000, classifier_batch_size=32,
      findings=(),  # single-finding prompts; (): every finding ("No Finding": a normal report)
      prompts_per_finding=4, samples_per_prompt=4,
      prompt_phantoms=not real,  # real reference for the prompts: phantoms with that finding
      num_examples=6,  # held-out reports shown in the report, per set
      periodic=False)
  if variant == "demo":
    # Inception-v3 at 299 px costs ~0.15 s per image on 2 CPU cores and FID runs over five sets
    # of N: N = 100 keeps the Inception to ~75 s. KID on halves of N, so that its spread over
    # subsets says something. The classifier's 600 steps (~2 min) reach a validation AUC of
    # ~0.85 (the supervised reference: 0.82 after 250 steps, 0.90 after 1,500).
    e.update(num_images=100, kid_subset_size=50, classifier_steps=600)
  elif variant == "tiny":
    e.update(num_images=8, batch_size=8, sample_steps=4, kid_subsets=5, classifier_steps=10,
             classifier_batch_size=8, findings=("No Finding", "Cardiomegaly", "Pleural Effusion"),
             prompts_per_finding=1, samples_per_prompt=2, num_examples=2)
  return e


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.model = _model(variant)

  # Objectives: weight 0 switches one off (its computation is skipped, not just zeroed).
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, itg=1.0, tig=1.0))
  c.label_smoothing = 0.1  # ITC and ITG
  # Beyond the paper: examples whose texts are token for token identical (one report for several
  # images of a study, common normal reports) are not each other's ITC / ITM negatives
  # (objectives.py; docs/PAPER_NOTES.md). False: the paper's losses.
  c.duplicate_aware_negatives = True

  # Data (medunifier_jax/data). Paths are config values; nothing is hard-coded.
  d = c.data = ml_collections.ConfigDict()
  d.name = "phantom_openi"  # phantoms paired with the real Open-i reports (+ templated ones)
  d.data_dir = ""  # for TFDS-built real data sets
  d.builder_config = ""  # TFDS configuration, e.g. "pneumonia_224px" (empty: the prepared one)
  d.tokenizer_dir = ""  # empty: train a WordPiece vocabulary on the report corpus, cache it here
  d.tokenizer_vocab_size = c.model.qformer.dec_token_id  # [DEC] takes the id after the vocab
  d.image_size = c.model.vit.image_size
  d.max_text_len = c.model.max_text_len
  d.max_words = 95  # reports are cut to this many words before tokenising (the paper's code)
  d.image_mean = (0.48145466, 0.4578275, 0.40821073)  # the BLIP-2 / CLIP normalisation
  d.image_std = (0.26862954, 0.26130258, 0.27577711)
  d.phantom_seed = 0
  d.templated_fraction = 0.5  # share of pre-training pairs with templated (not Open-i) reports
  d.num_train = 20000
  d.num_val = 500
  d.num_test = 500
  d.openi_split_seed = 0  # Open-i reports split 80/10/10 by a hash of (seed, file name)
  d.phantom_normal_fraction = 0.3  # share of templated phantoms without findings
  d.num_per_class_5x200 = 200  # phantom_5x200: images per class
  d.cls_num_train = 2000  # phantom_pneumonia / _pneumothorax / _covidx split sizes
  d.cls_num_val = 200
  d.cls_num_test = 500
  d.cls_positive_fraction = 0.5  # binary phantom sets: share of positives
  d.worker_count = 0  # grain worker processes (0: in the main process)
  d.shuffle_seed = 0

  # Optimisation (the paper's recipe, DESIGN.md section 1.6, plus warm-up and clipping).
  c.batch_size = 32  # global
  c.num_steps = 10000
  c.learning_rate = 1e-4
  c.end_learning_rate = 1e-8
  c.warmup_steps = 500
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.weight_decay = 0.05
  c.grad_clip_norm = 1.0
  c.compute_dtype = "float32"  # "bfloat16": bf16 compute, fp32 master weights
  c.remat = False  # rematerialise transformer blocks

  # Device mesh: one -1 is filled in with the remaining devices.
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

  # Checkpoints, logging, evaluation.
  # Initial weights, used only when the workdir has no checkpoint: one source per part
  # (`--config.init_from.vision=lavis-eva:FILE --config.init_from.qformer=hf-bert:DIR`), or one
  # string for the whole model (`--config.init_from=hf-blip2:DIR`, which the field's `object`
  # type admits). Kinds: hf-blip2:DIR, hf-bert:DIR, lavis-eva:FILE, lavis-blip2:FILE, random.
  parts = ml_collections.ConfigDict(dict(vision="", qformer=""))
  if variant == "paper":
    # The paper's initialisation: EVA ViT-g as BLIP-2 ships it, the Q-Former from a BERT
    # (CXR-BERT-general in the paper). Placeholders: replace them with real paths.
    parts.vision = "lavis-eva:/path/to/eva_vit_g.pth"
    parts.qformer = "hf-bert:/path/to/bert"
  c.init_from = ml_collections.FieldReference(parts, field_type=object)
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 50
  c.eval_every = 0  # 0: evaluate at the end only
  c.evals = _evals(variant, c.model.max_text_len)
  c.evals.image_gen = _image_gen_eval(variant)

  if variant == "paper":
    c.compute_dtype = "bfloat16"
    c.data.name = "mimic_cxr"
    c.batch_size = 256
    c.num_steps = 100000
    c.warmup_steps = 2000
  elif variant == "small":
    c.batch_size = 32
  elif variant == "bench_xs":
    c.batch_size = 8
    c.num_steps = 20
  elif variant == "demo":
    c.batch_size = 32
    # The demo's figures grow with the pairs seen, not with the learning rate or batch size
    # (README, "Status of the demo"); 1200 steps fill the demo's time budget.
    c.num_steps = 1200
    c.learning_rate = 5e-4
    c.warmup_steps = 50
    c.weight_decay = 0.01
    c.checkpoint_every = 200
  elif variant == "tiny":
    c.batch_size = 8
    c.num_steps = 20
    c.learning_rate = 1e-3
    c.warmup_steps = 2
    c.checkpoint_every = 10
    c.log_every = 5
    c.data.num_train, c.data.num_val, c.data.num_test = 256, 32, 32
  c.lock()
  return c
