r"""MedUnifier pre-training: ITC + ITM + ITG + TIG in one step.

Variants (the config's own argument selects one; nothing is copied between files):
  paper     EVA ViT-g/14 (frozen), BERT-base Q-Former, d=768, K=512, 224 px, 95 tokens.
  small     a reduced model that still has the paper's 16x16 patch grid (112 px, patch 7).
  demo      learns on phantom radiographs in minutes on 2 CPU cores (the README's main job).
  tiny      the smallest model that exercises every code path; used by the tests.
  bench_xs  the benchmark geometry: 112 px, patch 7, width 256, 4 layers, 4 heads, 32 queries,
            64 text tokens, vocabulary 30,592, batch 8, ViT frozen.

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

from medunifier_jax import config_lib

# Each variant is one table: the dotted fields it changes from the defaults built below (the
# paper's model and protocols, trained on the phantom stand-ins). Fields that restate another
# (data.image_size, data.max_text_len, ...) follow it (config_lib.DERIVED), and the geometry rules
# the sizes must satisfy are config_lib.check_geometry's.

# The reduced model that keeps the paper's 16x16 patch grid (small, bench_xs).
_SMALL_MODEL = {
  "model.vit.image_size": 112,
  "model.vit.patch_size": 7,
  "model.vit.width": 256,
  "model.vit.depth": 4,
  "model.vit.num_heads": 4,
  "model.vit.mlp_dim": 1024,
  "model.qformer.hidden_size": 256,
  "model.qformer.num_layers": 4,
  "model.qformer.num_heads": 4,
  "model.qformer.intermediate_size": 1024,
  "model.max_text_len": 64,
  "model.vqvae.latent_dim": 128,
  "model.vqvae.codebook_size": 512,
  "model.vqvae.decoder_channels": (256, 128),
}


def sharding_rules(fsdp: bool = False) -> list[tuple[str, str | None]]:
  """Logical weight axes -> mesh axes (medunifier_jax/training/sharding.py).

  With `fsdp`, parameters and optimizer moments are also split over the data axis (their
  `embed` dimension, and the VQ-VAE convolutions' input channels), so each device holds 1/D of
  the state and XLA gathers a weight where it is used: of the paper configuration's 14.5 GiB of
  parameters and moments, 1.8 GiB per device on 8 devices and 0.23 GiB on 64, instead of all
  of it on every device.
  """
  data = "data" if fsdp else None
  return [
    ("batch", "data"),
    ("embed", data),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("codebook", None),
    ("conv_in", data),
    ("conv_out", None),
  ]


VARIANTS = {
  "paper": {
    "compute_dtype": "bfloat16",
    # Parameters and Adam moments split over the devices instead of 14.5 GiB on each.
    "sharding_rules": sharding_rules(fsdp=True),
    "model.vqvae.remat_decoder": True,
    "model.vqvae.upsample_one_conv": True,
    # Scanned layer stacks with each layer rematerialised: 29.4 GiB peak per device on 8
    # devices against 37.7 GiB unrolled, and a shorter compile (docs/PERFORMANCE.md).
    "model.scan_layers": True,
    "remat": True,
    "batch_size": 256,
    "num_steps": 100000,
    "warmup_steps": 2000,
    # The paper's initialisation: EVA ViT-g as BLIP-2 ships it, the Q-Former from a BERT
    # (CXR-BERT-general in the paper). Placeholders: replace them with real paths.
    "init_from.vision": "lavis-eva:/path/to/eva_vit_g.pth",
    "init_from.qformer": "hf-bert:/path/to/bert",
    # The real data sets in place of the phantom stand-ins.
    "data.name": "mimic_cxr",
    "evals.zero_shot.datasets": ("chexpert_5x200", "mimic_5x200", "rsna_pneumonia"),
    "evals.zero_shot.class_set": "pneumonia",
    "evals.zero_shot.prompts": "paper",
    "evals.retrieval.datasets": ("mimic_5x200",),
    "evals.finetune.datasets": ("rsna_pneumonia", "siim_pneumothorax", "covidx"),
    "evals.report_gen.datasets": ("mimic_cxr",),
    "evals.image_gen.datasets": ("mimic_cxr",),
    "evals.image_gen.prompt_phantoms": False,
    "evals.reconstruction.datasets": ("mimic_cxr",),
    "evals.reconstruction.batch_size": 64,
  },
  "small": {
    **_SMALL_MODEL,
    "model.vit.frozen": False,
    # A WordPiece vocabulary trained on the report corpus (set data.tokenizer_dir and the
    # BERT ids 30592/30522/101 instead to use a pretrained BERT vocabulary).
    "model.qformer.vocab_size": 8320,
    "model.qformer.dec_token_id": 8192,
    "model.qformer.cls_token_id": 2,
    "batch_size": 32,
  },
  "bench_xs": {
    **_SMALL_MODEL,
    "model.qformer.vocab_size": 30592,
    "model.qformer.dec_token_id": 30522,
    "batch_size": 8,
    "num_steps": 20,
    "evals.reconstruction.batch_size": 8,
  },
  "demo": {
    "model.vit.image_size": 48,
    "model.vit.patch_size": 6,
    # Sized so that `make demo` (pre-training + every evaluation) fits in ~20 minutes on 2
    # CPU cores: the matching pass over 3B pairs dominates, so depth, queries and text
    # length are cut.
    "model.vit.width": 128,
    "model.vit.depth": 2,
    "model.vit.num_heads": 4,
    "model.vit.mlp_dim": 256,
    "model.vit.frozen": False,
    # A 3 x 3 convolutional stem (beyond BLIP-2; docs/PAPER_NOTES.md section 8): over two seeds
    # on the validation splits retrieval P@1 0.440 -> 0.533 and zero-shot 5x200 0.405 -> 0.421,
    # the 10% fine-tuning AUCs of pneumothorax 0.948 -> 0.918 and pneumonia 0.925 -> 0.900; a
    # step 2% longer.
    "model.vit.stem_channels": 16,
    "model.qformer.hidden_size": 128,
    "model.qformer.num_layers": 2,
    "model.qformer.num_heads": 4,
    "model.qformer.intermediate_size": 256,
    "model.qformer.num_queries": 8,
    # The tokenizer is trained on the report corpus.
    "model.qformer.vocab_size": 2176,
    "model.qformer.dec_token_id": 2048,
    "model.qformer.cls_token_id": 2,
    "model.embed_dim": 128,
    "model.max_text_len": 48,
    "model.vqvae.grid": 8,
    "model.vqvae.query_grid": (2, 4),
    # The paper's K=512 codes per level: with 128 the bottom level used every code and
    # reconstructions were 1.2 dB worse after 600 steps.
    "model.vqvae.latent_dim": 64,
    "model.vqvae.codebook_size": 512,
    # Two residual codes per bottom cell (beyond the paper; docs/PAPER_NOTES.md section 5):
    # on 500 validation images the finding fidelity of reconstructions rose from 0.710 to 0.755
    # and of the text prior's images from 0.724 to 0.737; three codes gave 0.749 and 0.723.
    "model.vqvae.bottom_depth": 2,
    "model.vqvae.decoder_channels": (128, 64),
    # Each x2 transposed conv as one convolution: a 3% shorter step on 2 CPU cores (A/B in one
    # process, `benchmark --vs model.vqvae.upsample_one_conv=True`, median of 12 pairs).
    "model.vqvae.upsample_one_conv": True,
    # The VQ-VAE at 4x the learning rate (beyond the paper; docs/PAPER_NOTES.md section 6): at
    # the shared rate its 1,400 steps left the finding fidelity of reconstructions at 0.755 on
    # 500 validation images, 1,000 more VQ-only steps gave 0.783, 2x the rate 0.783, 4x 0.787.
    "lr_multipliers.vqvae": 4.0,
    # With the paper's gradient-trained codebooks the top level collapsed to one code within
    # a few hundred steps and its loss, growing without bound, took over the clipped
    # gradient; EMA codebooks with dead-code restarts keep both levels in use.
    "model.vqvae.ema": True,
    "model.vqvae.restart_dead_codes": True,
    # ITC, ITM and TIG read the reports without their negated sentences; ITG still writes
    # them whole (beyond the paper; docs/PAPER_NOTES.md section 9). Over two seeds on the
    # validation splits (seeds 0 / 1) zero-shot 5x200 0.427 / 0.379 -> 0.611 / 0.580, retrieval
    # P@1 0.517 / 0.467 -> 0.642 / 0.510, BLEU-4 0.157 / 0.134 -> 0.161 / 0.163.
    "data.alignment_text": "affirmed",
    # The demo's figures grow with the pairs seen, not with the learning rate or batch size
    # (README, "Status of the demo"), so the demo's steps fill its time budget: 1,400 at 0.47 s
    # a step, 1,700 since the programs run on huge pages (0.375 s a step in the demo's loop).
    "batch_size": 32,
    "num_steps": 1700,
    "learning_rate": 5e-4,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "checkpoint_every": 200,
    # A fresh head on a few hundred phantom features learns nothing in 5 epochs at 1e-5;
    # the probe keeps the demo within its time budget.
    "evals.finetune.protocol": "linear_probe",
    "evals.finetune.learning_rate": 1e-3,
    "evals.finetune.epochs": 10,
    "evals.finetune.hidden_dim": 256,
    # Inception-v3 at 299 px costs ~0.15 s per image on 2 CPU cores and FID runs over five
    # sets of N: N = 100 keeps the Inception to ~75 s. KID on halves of N, so that its
    # spread over subsets says something. The classifier's 600 steps (~2 min) reach a
    # validation AUC of ~0.85 (the supervised reference: 0.82 after 250 steps, 0.90 after
    # 1,500).
    "evals.image_gen.num_images": 100,
    "evals.image_gen.kid_subset_size": 50,
    "evals.image_gen.classifier_steps": 600,
    # Chosen on 500 validation reports (configs/prior.py, sample.temperature / candidates).
    "evals.image_gen.temperature": 0.8,
    "evals.image_gen.candidates": 2,
  },
  "tiny": {
    "model.vit.image_size": 48,
    "model.vit.patch_size": 6,
    "model.vit.width": 32,
    "model.vit.depth": 2,
    "model.vit.num_heads": 2,
    "model.vit.mlp_dim": 64,
    "model.vit.frozen": False,
    "model.qformer.hidden_size": 32,
    "model.qformer.num_layers": 2,
    "model.qformer.num_heads": 2,
    "model.qformer.intermediate_size": 64,
    "model.qformer.num_queries": 8,
    "model.qformer.max_position_embeddings": 64,
    "model.qformer.vocab_size": 640,
    "model.qformer.dec_token_id": 512,
    "model.qformer.cls_token_id": 2,
    "model.embed_dim": 16,
    "model.max_text_len": 24,
    "model.vqvae.grid": 8,
    "model.vqvae.query_grid": (2, 4),
    "model.vqvae.latent_dim": 16,
    "model.vqvae.codebook_size": 32,
    "model.vqvae.num_res_layers": 1,
    "model.vqvae.decoder_channels": (32, 16),
    "batch_size": 8,
    "num_steps": 20,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "checkpoint_every": 10,
    "log_every": 5,
    "evals.reconstruction.num_images": 16,
    "evals.reconstruction.batch_size": 8,
    "data.num_train": 256,
    "data.num_val": 32,
    "data.num_test": 32,
    # The tests train tiny models without evaluating.
    "evals.zero_shot.batch_size": 8,
    "evals.zero_shot.periodic": False,
    "evals.retrieval.batch_size": 8,
    "evals.retrieval.periodic": False,
    "evals.finetune.protocol": "linear_probe",
    "evals.finetune.label_fractions": (0.1, 1.0),
    "evals.finetune.learning_rate": 1e-3,
    "evals.finetune.epochs": 2,
    "evals.finetune.hidden_dim": 32,
    "evals.finetune.feature_batch_size": 8,
    "evals.report_gen.batch_size": 4,
    "evals.report_gen.max_examples": 8,
    "evals.image_gen.num_images": 8,
    "evals.image_gen.batch_size": 8,
    "evals.image_gen.sample_steps": 4,
    "evals.image_gen.kid_subsets": 5,
    "evals.image_gen.classifier_steps": 10,
    "evals.image_gen.classifier_batch_size": 8,
    "evals.image_gen.findings": ("No Finding", "Cardiomegaly", "Pleural Effusion"),
    "evals.image_gen.prompts_per_finding": 1,
    "evals.image_gen.samples_per_prompt": 2,
    "evals.image_gen.num_examples": 2,
  },
}


def _model() -> ml_collections.ConfigDict:
  """The paper's / BLIP-2's model; variants change sizes only."""
  m = ml_collections.ConfigDict()
  vit = m.vit = ml_collections.ConfigDict()
  qf = m.qformer = ml_collections.ConfigDict()
  vq = m.vqvae = ml_collections.ConfigDict()

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
  # Beyond BLIP-2: C > 0 puts a 3 x 3 convolution to C channels and a GELU before the patch
  # embedding (models/vit.py), for a ViT trained from scratch; pretrained weights have none.
  vit.stem_channels = 0

  qf.hidden_size = 768
  qf.num_layers = 12
  qf.num_heads = 12
  qf.intermediate_size = 3072
  qf.cross_attention_freq = 2
  qf.num_queries = 32
  # BERT's 30,522 + [DEC], padded to a multiple of 128 so that the vocabulary splits evenly over
  # a model axis of 2, 4, ..., 128; ids above dec_token_id are never fed and never predicted.
  qf.vocab_size = 30592
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
  # One lax.scan over the ViT blocks and over the Q-Former's layers (in groups of
  # cross_attention_freq): each kind of layer is compiled once instead of once per layer and
  # pass, for deep stacks' compile time (docs/PERFORMANCE.md). Off, the step is as before to
  # the bit; on, the same values up to rounding and another dropout stream (models/stack.py).
  m.scan_layers = False

  vq.latent_dim = 768  # d
  vq.codebook_size = 512  # K, both levels
  # Codes per bottom cell: 1 is the paper's; R > 1 quantizes residuals with R codebooks
  # (models/vqvae.py), R times the bits per cell.
  vq.bottom_depth = 1
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
  # Memory of the decoder's backward pass (docs/PERFORMANCE.md); off, the step is as before to
  # the bit. remat_decoder: each upsampling stage (transposed conv + BatchNorm + ReLU) keeps
  # only its input and is recomputed there. upsample_one_conv: each x2 transposed conv runs as
  # one convolution instead of four phase convolutions (same values up to rounding).
  vq.remat_decoder = False
  vq.upsample_one_conv = False
  return m


def _data() -> ml_collections.ConfigDict:
  """Data (medunifier_jax/data). Paths are config values; nothing is hard-coded."""
  d = ml_collections.ConfigDict()
  d.name = "phantom_openi"  # phantoms paired with the real Open-i reports (+ templated ones)
  d.data_dir = ""  # for TFDS-built real data sets
  d.builder_config = ""  # TFDS configuration, e.g. "pneumonia_224px" (empty: the prepared one)
  d.tokenizer_dir = ""  # empty: train a WordPiece vocabulary on the report corpus, cache it here
  # Restated model sizes, linked to them by config_lib.derive.
  d.tokenizer_vocab_size = 0  # model.qformer.dec_token_id: [DEC] takes the id after the vocab
  d.image_size = 0  # model.vit.image_size
  d.max_text_len = 0  # model.max_text_len
  d.max_words = 95  # reports are cut to this many words before tokenising (the paper's code)
  # The text ITC, ITM and TIG read: "report" (the paper) or "affirmed" (the report without its
  # negated sentences; ITG still writes the whole report; docs/PAPER_NOTES.md section 9).
  d.alignment_text = "report"
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
  return d


def _evals() -> ml_collections.ConfigDict:
  """Downstream evaluations (medunifier_jax/evaluators, DESIGN.md section 3), by entry name.

  Each entry's `task` (default: its name) picks the evaluator; `periodic` entries also run
  during training every `eval_every` steps. Defaults are the paper's protocols on the phantom
  stand-ins; the paper variant names the real data sets.
  """
  e = ml_collections.ConfigDict()
  e.zero_shot = dict(
    datasets=("phantom_5x200", "phantom_pneumonia"),
    split="test",
    # The phantom 5x200 set renders GLoRIA's classes (Consolidation, not Pneumonia), and the
    # phantom reports use the project's phrasing: after 400 demo steps the paper vocabulary
    # scored 5x200 accuracy 0.21 (chance) where the project's scored 0.29.
    prompts="project",  # "paper": the CheXpert class-prompt vocabulary; "project": our own lists
    class_set="gloria",  # 5x200 classes: "pneumonia" (authors' code), "gloria", "" (any)
    num_prompts=0,  # per class; 0: the vocabulary's (paper: 15 CheXpert, 10 RSNA; project: 5)
    prompt_seed=1,  # the authors' code draws from Python's random seeded with 1
    prompt_pooling="max",  # class score over its prompts' raw similarities: "max" or "mean"
    batch_size=32,
    itm_rescore=False,
    itm_batch_size=64,
    periodic=True,
  )
  e.retrieval = dict(
    datasets=("phantom_5x200",),
    split="test",
    batch_size=32,
    ks=(1, 5, 10),
    itm_rerank_k=0,  # > 0: re-rank each query's top k with the ITM head (paper 256)
    itm_batch_size=64,
    periodic=True,
  )
  e.finetune = dict(
    datasets=("phantom_pneumonia", "phantom_pneumothorax", "phantom_covidx"),
    train_split="train",
    val_split="validation",
    test_split="test",
    # "paper": Q-Former and queries fine-tuned end to end, ViT frozen (the authors' code);
    # "linear_probe": a head on frozen, cached query outputs (cheap; not the paper's figures).
    protocol="paper",
    label_fractions=(0.01, 0.1, 1.0),
    learning_rate=1e-5,
    batch_size=8,
    epochs=5,
    end_learning_rate=1e-8,  # paper protocol: cosine to this over all steps (authors' code)
    schedule="cosine",  # paper protocol: "cosine" or "constant" (the probe is constant)
    adam_b1=0.9,
    adam_b2=0.95,  # paper protocol (the probe keeps optax's defaults)
    weight_decay=0.01,  # AdamW, as the authors' code sets it
    hidden_dim=768,  # width between the two linear layers (the authors' code)
    pooling="flatten",  # query outputs into the head: "flatten" (Q*H, authors') or "mean"
    select_metric="auc",  # on the validation split, per epoch
    feature_batch_size=32,
    seed=0,
    periodic=False,
  )
  e.report_gen = dict(
    datasets=("phantom_openi",),
    split="test",
    train_split="train",
    batch_size=16,
    max_examples=0,
    method="beam",
    num_beams=3,
    max_length=0,  # min(95, model.max_text_len), linked by config_lib.derive
    min_length=3,
    length_penalty=1.0,
    repetition_penalty=1.0,
    early_stopping=False,
    top_p=0.9,
    temperature=1.0,
    seed=0,
    meteor=True,
    split_references=True,
    labeler="rule",  # clinical-efficacy reader: evaluators/labeler.py LABELERS
    baseline=True,  # also score the most frequent training report, a model-free baseline
    periodic=False,
  )
  e.reconstruction = dict(
    datasets=("phantom_openi",),  # the pre-training data set
    split="test",
    num_images=256,  # the first of the split; 0: all of it
    batch_size=32,
    num_examples=6,  # images kept for the report's figures
    periodic=False,
  )
  e.image_gen = _image_gen_eval()
  return e


def _image_gen_eval() -> dict:
  """The text-to-image entry (medunifier_jax/evaluators/image_gen.py, README "Drawing images
  from reports"): images the prior draws for held-out reports against real test images (FID,
  KID) beside the unconditional prior, VQ reconstructions and real training images, and finding
  fidelity read by a classifier trained on real images. Needs a trained prior (WORKDIR/prior);
  without one only the baselines are scored.
  """
  return dict(
    datasets=("phantom_openi",),  # the pre-training data
    split="test",
    train_split="train",
    val_split="validation",
    num_images=0,  # per set, the first of each split (0: the whole test split)
    batch_size=32,  # reports per generation / reconstruction / Inception call
    prior_dir="",  # the text prior; "": WORKDIR/prior
    uncond_prior_dir="",  # condition="none" prior; "": WORKDIR/prior_uncond, else null condition
    sample_steps=12,
    guidance=1.0,  # chosen on the validation split (configs/prior.py, sample.guidance)
    temperature=1.0,
    # Draws per image for the text prior; the one the MedUnifier's ITM head scores highest
    # against its report is kept (prior/sample.py). The baselines always draw once.
    candidates=1,
    seed=0,  # fixed: never tuned on test
    inception_cache="",  # converted FID Inception weights; "": ~/.cache/medunifier_jax/...
    kid_subsets=100,
    kid_subset_size=1000,
    classifier_dir="",  # cached fidelity classifier; "": WORKDIR/eval/fidelity_classifier
    classifier_steps=5000,
    classifier_batch_size=32,
    findings=(),  # single-finding prompts; (): every finding ("No Finding": a normal report)
    prompts_per_finding=4,
    samples_per_prompt=4,
    prompt_phantoms=True,  # real reference for the prompts: phantoms with that finding
    num_examples=6,  # held-out reports shown in the report, per set
    periodic=False,
  )


def engine_fields(**changes) -> dict:
  """Fields of the training engine (medunifier_jax/training) with pre-training's values, and
  `changes`; configs/prior.py trains on the same engine and starts from these too."""
  fields = dict(
    seed=0,
    # Optimisation (the paper's recipe, DESIGN.md section 1.6, plus warm-up and clipping).
    batch_size=32,  # global
    num_steps=10000,
    learning_rate=1e-4,
    end_learning_rate=1e-8,
    warmup_steps=500,
    adam_b1=0.9,
    adam_b2=0.95,
    weight_decay=0.05,
    grad_clip_norm=1.0,
    # Beyond the paper: {submodule name: factor} scales the learning rate (and with it the weight
    # decay) of every parameter under a submodule of that name; factor 1 changes nothing.
    lr_multipliers={},
    compute_dtype="float32",  # "bfloat16": bf16 compute, fp32 master weights
    remat=False,  # rematerialise transformer blocks
    # Device mesh: one -1 is filled in with the remaining devices.
    mesh=[("data", -1), ("model", 1)],
    sharding_rules=sharding_rules(),
    checkpoint_every=500,
    keep_checkpoints=3,
    log_every=50,
    eval_every=0,  # 0: evaluate at the end only
  )
  unknown = set(changes) - set(fields)
  if unknown:
    raise KeyError(f"not engine fields: {sorted(unknown)}")
  return {**fields, **changes}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = config_lib.select_variant(arg, VARIANTS, default="demo")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.update(engine_fields())
  c.model = _model()

  # Objectives: weight 0 switches one off (its computation is skipped, not just zeroed).
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, itg=1.0, tig=1.0))
  c.lr_multipliers = ml_collections.ConfigDict(dict(vqvae=1.0))  # --config.lr_multipliers.vqvae=2
  c.label_smoothing = 0.1  # ITC and ITG
  # Beyond the paper: examples whose texts are token for token identical (one report for several
  # images of a study, common normal reports) are not each other's ITC / ITM negatives
  # (objectives.py; docs/PAPER_NOTES.md). False: the paper's losses.
  c.duplicate_aware_negatives = True
  # The generator of dropout's random bits (objectives.compute_losses): "threefry2x32" splits the
  # step key; "rbg" / "unsafe_rbg" draw a key of that kind from it for XLA's RngBitGenerator,
  # which made the CPU step slower (docs/PERFORMANCE.md, "Where the step's time goes").
  c.dropout_prng = "threefry2x32"
  # Beyond the paper: b > 0 trains ITM, ITG and TIG on the batch's first b examples only, while
  # ITC contrasts the whole batch (more contrastive pairs per step for one more image and text
  # pass per extra example; objectives.compute_losses). 0: every objective on the whole batch.
  c.itm_itg_tig_batch = 0
  c.data = _data()

  # Initial weights, used only when the workdir has no checkpoint: one source per part
  # (`--config.init_from.vision=lavis-eva:FILE --config.init_from.qformer=hf-bert:DIR`), or one
  # string for the whole model (`--config.init_from=hf-blip2:DIR`, which the field's `object`
  # type admits). Kinds: hf-blip2:DIR, hf-bert:DIR, lavis-eva:FILE, lavis-blip2:FILE, random.
  parts = ml_collections.ConfigDict(dict(vision="", qformer=""))
  c.init_from = ml_collections.FieldReference(parts, field_type=object)
  c.evals = _evals()

  config_lib.override(c, VARIANTS[variant])
  config_lib.derive(c)
  c.lock()
  return c
