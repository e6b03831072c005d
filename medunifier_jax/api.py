"""The public inference API.

    from medunifier_jax import api
    model = api.load("hf-blip2:/path/to/blip2")      # or "hf-bert:DIR" (config=...), or a workdir
    q = model.encode_image(pixel_values)              # (B, Q, H) query outputs
    h = model.encode_text(input_ids, attention_mask)  # (B, T, H) text-mode hidden states
    s = model.similarity(pixel_values, input_ids, attention_mask)  # (n_images, n_texts)
    l = model.itm_logits(pixel_values, input_ids, attention_mask)  # (n, 2) row-aligned pairs
    reports = model.generate_reports(pixel_values)    # B strings (needs the tokenizer)
    images = model.generate_images(["right pleural effusion"], num_per_text=4)  # needs a prior

`pixel_values` are float32 NHWC images of the model's size, normalised with
`config.data.image_mean/std`, e.g. from `model.preprocess_images(paths)` (DICOM, PNG, JPEG,
bytes or arrays, prepared as for training); `input_ids`/`attention_mask` are (B, T) integers
(`[CLS] ... [SEP]`, then padding), e.g. from `model.tokenize(texts)`. Every method returns NumPy
arrays. Each method checks its inputs and then runs a pure function of the model under
`jax.jit`; the compiled function is cached per input shape, so repeated calls with one batch
shape compile once. `python -m medunifier_jax.predict` is the command-line face of this API.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax import config_lib, inference, model_io
from medunifier_jax.models.medunifier import MedUnifier
from medunifier_jax.objectives import itc_similarity
from medunifier_jax.weights import hf_import
from medunifier_jax.weights.mapping import ImportReport

HF_BLIP2 = "hf-blip2:"
HF_BERT = "hf-bert:"
# The configuration used when none is passed: the paper's, next to the package in a checkout.
DEFAULT_CONFIG = "configs/pretrain.py:paper"


# -- the model handle --------------------------------------------------------------------------


class Model:
  """A MedUnifier model ready for inference.

  Attributes:
    module: the `MedUnifier` NNX module.
    config: the full configuration (`config.model` built the module; `config.data` gives the
      image normalisation and text length).
    tokenizer: a `transformers.BertTokenizerFast` with `[DEC]`, or None.
    import_report: for imported weights, what was loaded and what kept its initial value.

  The handle takes a snapshot of the module's weights when it is made. Further methods follow
  one pattern: check the inputs, then `self.run(pure_fn, *arrays)`.

  `prior` is the text-conditioned image prior (`prior.sample.TrainedPrior`) that
  `generate_images` samples, set by `load` when one was trained (else None);
  `checkpoint_step` the training step a workdir's weights were restored from (else None).
  """

  prior = None
  checkpoint_step: int | None = None

  def __init__(
    self,
    module: MedUnifier,
    config: ml_collections.ConfigDict,
    tokenizer=None,
    import_report: ImportReport | None = None,
  ):
    self.module = module
    self.config = config
    self.tokenizer = tokenizer
    self.import_report = import_report
    model_cfg = config.model
    self.image_size = model_cfg.vit.image_size
    # Ids past [DEC] are padding rows of the vocabulary (never fed, never predicted).
    self.vocab_size = int(model_cfg.qformer.dec_token_id) + 1
    self.max_positions = model_cfg.qformer.max_position_embeddings
    self._graphdef, self._state = nnx.split(module)
    self.fns = inference.model_fns(self._graphdef)

  # -- running pure functions ----------------------------------------------------------------

  def run(self, fn: Callable, *arrays):
    """`fn(module, *arrays)` under `jax.jit`; the result as NumPy arrays (same tree).

    Compiled once per function, architecture and input shapes; pass a module-level function
    (a new lambda per call would compile anew each time).
    """
    return jax.tree.map(np.asarray, inference.compiled(fn)(self._graphdef, self._state, *arrays))

  # -- the stable API ------------------------------------------------------------------------

  def encode_image(self, pixel_values) -> np.ndarray:
    """(B, S, S, 3) normalised float32 -> (B, Q, H) Q-Former query outputs."""
    return self._features(pixel_values)["queries"]

  def encode_text(self, input_ids, attention_mask) -> np.ndarray:
    """(B, T) ids and mask -> (B, T, H) text-mode hidden states ([CLS] first)."""
    return self._text_features(input_ids, attention_mask)["text_hidden"]

  def similarity(self, pixel_values, input_ids, attention_mask) -> np.ndarray:
    """(n_images, n_texts): max over queries of the cosine of the projected features.

    No temperature is applied (multiply by 1 / temperature for the ITC logits).
    """
    text = self.text_embeddings(input_ids, attention_mask)
    return np.asarray(itc_similarity(self.image_embeddings(pixel_values), text))

  def itm_logits(self, pixel_values, input_ids, attention_mask) -> np.ndarray:
    """(n, 2) image-text matching logits for row-aligned pairs (image i with text i).

    Column 0 is "no match", column 1 "match": `softmax(logits)[:, 1]` is the matching
    probability. To score every image against every text, repeat the image rows and tile the
    text rows (`np.repeat(pixels, n_texts, 0)`, `np.tile(ids, (n_images, 1))`).
    """
    pixels, ids, mask = self._pairs(
      pixel_values,
      input_ids,
      attention_mask,
      "itm_logits scores row-aligned pairs",
      "; pass as many texts as images (repeat rows to pair them)",
    )
    return np.asarray(
      self.fns.itm_logits(self._state, self.fns.image_tokens(self._state, pixels), ids, mask)
    )

  # -- helpers for evaluators ----------------------------------------------------------------

  def image_embeddings(self, pixel_values) -> np.ndarray:
    """(B, S, S, 3) -> (B, Q, E) L2-normalised projected query features."""
    return self._features(pixel_values)["image_emb"]

  def text_embeddings(self, input_ids, attention_mask) -> np.ndarray:
    """(B, T) -> (B, E) L2-normalised projected [CLS] features."""
    return self._text_features(input_ids, attention_mask)["text_emb"]

  def image_tokens(self, pixel_values) -> np.ndarray:
    """(B, S, S, 3) -> (B, 1 + N, Dv) ViT tokens after `ln_vision`."""
    return np.asarray(self.fns.image_tokens(self._state, self._pixels(pixel_values)))

  def reconstruct(self, pixel_values, input_ids, attention_mask) -> dict[str, np.ndarray]:
    """The image rebuilt from its text-grounded codes (the TIG path, evaluation mode).

    Returns `recon` (B, S, S, 3) in [0, 1], `codes_top` (B, g/2, g/2) and `codes_bottom`
    (B, g, g) int32, g the VQ-VAE grid ((B, g, g, R) with `vqvae.bottom_depth` R > 1).
    """
    pixels, ids, mask = self._pairs(
      pixel_values, input_ids, attention_mask, "reconstruct pairs each image with its report"
    )
    return jax.tree.map(np.asarray, self.fns.reconstruct(self._state, pixels, ids, mask))

  def _features(self, pixel_values) -> dict[str, np.ndarray]:
    out = self.fns.image_features(self._state, self._pixels(pixel_values))
    return {k: np.asarray(v) for k, v in out.items() if k != "image_tokens"}

  def _text_features(self, input_ids, attention_mask) -> dict[str, np.ndarray]:
    out = self.fns.text_features(self._state, *self._text(input_ids, attention_mask))
    return jax.tree.map(np.asarray, out)

  def generate_reports(self, pixel_values, *, seed: int = 0, **decoding) -> list[str]:
    """(B, S, S, 3) normalised images -> B generated reports.

    `decoding` takes `generation.DecodingConfig` fields (`method` beam/greedy/nucleus,
    `num_beams`, `max_length`, `min_length`, `top_p`, ...); the defaults are the paper's, with
    `max_length` capped at the model's text length. `seed` drives nucleus sampling.
    """
    from medunifier_jax import generation

    if self.tokenizer is None:
      raise ValueError(
        "generate_reports needs the model's tokenizer: load a training workdir, "
        "or a folder that holds vocab.txt / tokenizer.json"
      )
    pixels = self._pixels(pixel_values)
    decoding.setdefault("max_length", min(95, int(self.config.model.max_text_len)))
    if getattr(self, "_generator", None) is None:
      self._generator = generation.ReportGenerator(
        self._graphdef, self.tokenizer, int(self.config.model.qformer.dec_token_id)
      )
    return self._generator(
      self._state, pixels, generation.DecodingConfig(**decoding), jax.random.key(seed)
    )

  def generate_images(
    self,
    texts: Sequence[str],
    *,
    num_per_text: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    temperature: float | None = None,
    candidates: int | None = None,
    seed: int = 0,
  ) -> np.ndarray:
    """Reports -> (len(texts) * num_per_text, S, S, 3) float32 images in [0, 1].

    The prior's codes are drawn by parallel decoding conditioned on each report's text states,
    then decoded by the VQ-VAE (`prior/sample.py`); rows are text 0's samples, then text 1's,
    ... `steps` (decoding steps), `guidance` (classifier-free guidance weight: logits = cond +
    guidance * (cond - uncond); 0 = conditional only), `temperature` and `candidates` (each
    image the best of that many drafts by this model's image-text matching score; 1: the first
    draw) default to the prior config's `sample` values. The same seed gives the same images.

    Raises:
      ValueError: no prior is attached (the message names the command that trains one), or
        bad arguments.
    """
    from medunifier_jax.prior import sample as prior_sample

    if self.prior is None:
      raise ValueError(
        "this model has no image prior, so it cannot draw images from reports; train one on "
        f"its codes with\n  {prior_sample.train_command('WORKDIR')}\nthen load with "
        "api.load(WORKDIR) (which attaches WORKDIR/prior) or api.load(WORKDIR, prior=DIR)"
      )
    if isinstance(texts, str):
      raise TypeError("generate_images takes a list of texts; wrap a single text in a list")
    texts = list(texts)
    if not texts:
      raise ValueError("generate_images needs at least one text")
    if int(num_per_text) < 1:
      raise ValueError(f"num_per_text must be at least 1, got {num_per_text}")
    tokens = self.tokenize(texts)
    ids = np.repeat(tokens["input_ids"], int(num_per_text), axis=0)
    mask = np.repeat(tokens["attention_mask"], int(num_per_text), axis=0)
    ids, mask = self._text(ids, mask)
    out = self.prior.generate(
      self._graphdef,
      self._state,
      ids,
      mask,
      seed=seed,
      steps=steps,
      guidance=guidance,
      temperature=temperature,
      candidates=candidates,
      pixel_stats=prior_sample.pixel_stats(self.config),
    )
    return out["images"]

  def temperature(self) -> float:
    """The learned ITC temperature (clamped as in training)."""
    return float(self.module.temperature())

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self._graphdef

  @property
  def state(self) -> nnx.State:
    """The weights this handle runs with (`nnx.merge(graphdef, state)` rebuilds the module)."""
    return self._state

  # -- preparing inputs ----------------------------------------------------------------------

  def tokenize(
    self, texts: Sequence[str], max_len: int | None = None, *, clean: bool = True
  ) -> dict[str, np.ndarray]:
    """Texts -> `input_ids`, `attention_mask` int32 (B, max_len), default model.max_text_len.

    With `clean`, each text is first cleaned as training reports are (`data.text.clean_report`).
    """
    if self.tokenizer is None:
      raise ValueError(
        "this model has no tokenizer; load one with medunifier_jax.data.tokenizer."
        "load_tokenizer(folder) and pass it to api.Model, or tokenize the texts yourself"
      )
    from medunifier_jax.data import text as text_lib
    from medunifier_jax.data.tokenizer import tokenize

    if isinstance(texts, str):
      raise TypeError("tokenize takes a list of texts; wrap a single text in a list")
    texts = [text_lib.clean_report(t) if clean else t for t in texts]
    return tokenize(self.tokenizer, texts, max_len or self.config.model.max_text_len)

  def preprocess_images(self, images: Sequence) -> np.ndarray:
    """Image files, bytes or arrays -> (B, S, S, 3) float32 model input, as training sees it.

    `images` is a list (or an array whose first axis is the batch; a single path or bytes is
    taken as a batch of one). Each image is a path to a DICOM, PNG (8- or 16-bit) or JPEG file,
    the file's bytes, a PIL image, or an array (H, W) / (H, W, 1) / (H, W, 3) of uint8, of
    floats in [0, 1], or of other values (min-max scaled). The steps are
    `data.images.model_input`, the ones the data set builders and the input pipeline use:
    grayscale (luminance; DICOM with its modality/VOI LUTs, MONOCHROME1 inverted), 16-bit and
    other ranges min-max scaled to 8 bits, the longer side resized to S (bicubic) and centred
    on a black square (aspect ratio kept), repeated to 3 channels and normalised with
    `config.data.image_mean/std`. A file prepared by a builder at size S gives the same input.

    Raises:
      FileNotFoundError: a path does not exist (`data.images.ImageFileMissing`).
      ValueError: an image cannot be decoded (`data.images.ImageReadError`, naming the file)
        or has an unsupported shape or dtype.
    """
    from medunifier_jax.data import images as images_lib

    if isinstance(images, str | bytes | os.PathLike):
      images = [images]
    return images_lib.model_input(
      images, self.image_size, self.config.data.image_mean, self.config.data.image_std
    )

  # -- input checks --------------------------------------------------------------------------

  def _pixels(self, pixel_values) -> np.ndarray:
    x = np.asarray(pixel_values)
    s = self.image_size
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(
        f"pixel_values must be float32 images normalised with config.data.image_mean/std, "
        f"got dtype {x.dtype}; convert to [0, 1] floats and normalise first"
      )
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      hint = f"resize images to {s}x{s}"
      if x.ndim == 4 and x.shape[1] == 3 and x.shape[3] != 3:
        hint = "the array looks channels-first (NCHW); transpose it to NHWC"
      elif x.ndim == 3:
        hint = "add a batch axis"
      raise ValueError(
        f"expected pixel_values of shape (B, {s}, {s}, 3) (NHWC), got {x.shape}; {hint}"
      )
    if x.shape[0] == 0:
      raise ValueError("pixel_values holds no images")
    return x.astype(np.float32)

  def _pairs(
    self, pixel_values, input_ids, attention_mask, what: str, advice: str = ""
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked images and texts that must be as many (image i goes with text i); `what` and
    `advice` frame the error when they are not."""
    pixels = self._pixels(pixel_values)
    ids, mask = self._text(input_ids, attention_mask)
    if pixels.shape[0] != ids.shape[0]:
      raise ValueError(f"{what}: got {pixels.shape[0]} images and {ids.shape[0]} texts{advice}")
    return pixels, ids, mask

  def _text(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(
        f"expected input_ids and attention_mask of one shape (B, T), got {ids.shape} and "
        f"{mask.shape}"
      )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
      raise ValueError(f"input_ids holds no tokens (shape {ids.shape})")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] > self.max_positions:
      raise ValueError(
        f"texts of {ids.shape[1]} tokens exceed the model's {self.max_positions} positions; "
        f"truncate to config.model.max_text_len={self.config.model.max_text_len}"
      )
    bad = (ids < 0) | (ids >= self.vocab_size)
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise ValueError(
        f"token id {ids[row, col]} at input_ids[{row}, {col}] is outside the vocabulary "
        f"[0, {self.vocab_size}); use the model's tokenizer ({bad.sum()} ids are out of range)"
      )
    if not np.isin(mask, (0, 1)).all():
      raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return ids.astype(np.int32), mask.astype(np.int32)


# -- loading -----------------------------------------------------------------------------------


def load(
  source: str,
  *,
  config: ml_collections.ConfigDict | str | None = None,
  allow: Iterable[str] = (),
  seed: int | None = None,
  dtype: str = "float32",
  prior: str | None = None,
) -> Model:
  """Loads a model for inference.

  Args:
    source: `"hf-blip2:DIR"` (a transformers `Blip2ForImageTextRetrieval` folder; the model's
      sizes come from its config.json), `"hf-bert:DIR"` (a BERT folder for the Q-Former's text
      weights; needs `config`), or a training work directory.
    config: a full configuration (as from configs/pretrain.py), or `"PATH.py:VARIANT"`. For
      BLIP-2 it supplies what BLIP-2 lacks (VQ-VAE sizes, temperature bounds, text length);
      default: the `paper` variant. The VQ-VAE is not part of BLIP-2 or BERT and keeps its
      initial weights.
    allow: more glob patterns of weights that may stay at init or go unused, on top of those a
      BLIP-2 / BERT file never has (`weights.BLIP2_NOT_IN_CHECKPOINT`,
      `weights.BERT_NOT_IN_CHECKPOINT`).
    seed: initialisation seed for the weights the source does not provide (default the
      configuration's `seed`).
    dtype: compute dtype ("float32" or "bfloat16"); weights stay float32.
    prior: the workdir of an image prior trained on this model's codes (configs/prior.py), for
      `Model.generate_images`; default for a training workdir: `WORKDIR/prior` when it holds a
      trained one.

  Raises:
    WeightImportError: the checkpoint's weights do not fit (missing/unexpected/shape, listed).
    ValueError: an unknown source form or a configuration that does not fit the source.
    FileNotFoundError: the folder or its files are missing.
  """
  if not isinstance(source, str):
    raise TypeError(f"source must be a string, got {type(source).__name__}")
  from medunifier_jax import paths
  from medunifier_jax.prior.sample import attach_prior

  prior = None if prior is None else paths.resolve(prior)
  if source.startswith(HF_BLIP2):
    folder = paths.resolve(source[len(HF_BLIP2) :])
    model = _load_hf_blip2(folder, config, tuple(allow), seed, dtype)
    attach_prior(model, prior, None)
    return model
  if source.startswith(HF_BERT):
    folder = paths.resolve(source[len(HF_BERT) :])
    model = _load_hf_bert(folder, config, tuple(allow), seed, dtype)
    attach_prior(model, prior, None)
    return model
  is_url = paths.is_remote(source)  # e.g. gs://bucket/workdir
  if ":" in source and not is_url and not os.path.exists(source):
    raise ValueError(
      f"unknown source {source!r}: use 'hf-blip2:DIR', 'hf-bert:DIR' or a training workdir"
    )
  if not is_url and not os.path.isdir(source):
    raise FileNotFoundError(
      f"{source!r} is not a directory; pass a training workdir, 'hf-blip2:DIR' or 'hf-bert:DIR'"
    )
  workdir = paths.resolve(source)
  model = _load_workdir(workdir, config, dtype=dtype)
  attach_prior(model, prior, workdir)
  return model


def _load_workdir(workdir: str, config, *, dtype: str) -> Model:
  """A model restored from a training work directory's newest readable checkpoint.

  The configuration is the run's own (`WORKDIR/config.json`, written by training) unless
  `config` is given; only the model's variables are read (no optimizer state). The tokenizer is
  the vocabulary the run trained and cached in `WORKDIR/tokenizer`, else
  `config.data.tokenizer_dir`, else None.
  """
  restored = model_io.restore(
    workdir, resolve_config(config) if config is not None else None, compute_dtype=dtype
  )
  logging.info("restored %s at step %d", workdir, restored.step)
  model = Model(restored.module, restored.config, _workdir_tokenizer(workdir, restored.config))
  model.checkpoint_step = restored.step
  return model


def _workdir_tokenizer(workdir: str, cfg: ml_collections.ConfigDict):
  from medunifier_jax.data.tokenizer import load_tokenizer

  cached = os.path.join(workdir, "tokenizer")
  if os.path.isdir(cached):
    folders = sorted(
      f for f in os.listdir(cached) if os.path.isfile(os.path.join(cached, f, "vocab.txt"))
    )
    if folders:
      return load_tokenizer(os.path.join(cached, folders[-1]))
  if cfg.data.get("tokenizer_dir"):
    return load_tokenizer(cfg.data.tokenizer_dir)
  return None


def _load_hf_blip2(folder, config, allow, seed, dtype) -> Model:
  tokenizer = hf_import.folder_tokenizer(folder)
  cfg = hf_import.blip2_config(folder, resolve_config(config), tokenizer)
  return _build_imported(cfg, "hf-blip2", folder, tokenizer, seed, dtype, allow)


def _load_hf_bert(folder, config, allow, seed, dtype) -> Model:
  if config is None:
    raise ValueError(
      "hf-bert needs config=...: BERT provides only the Q-Former's text weights, so the "
      "ViT, queries, heads and VQ-VAE sizes come from the configuration (size the Q-Former "
      "like the BERT with weights.bert_config(folder, config))"
    )
  cfg = copy.deepcopy(resolve_config(config))
  tokenizer = hf_import.folder_tokenizer(folder)
  if tokenizer is not None:
    from medunifier_jax.data.tokenizer import check_tokenizer

    check_tokenizer(tokenizer, cfg.model)
  return _build_imported(cfg, "hf-bert", folder, tokenizer, seed, dtype, allow)


# Per import kind: its importer and the model weights its checkpoints cannot provide.
_IMPORTERS = {
  "hf-blip2": (hf_import.import_blip2, hf_import.BLIP2_NOT_IN_CHECKPOINT),
  "hf-bert": (hf_import.import_bert, hf_import.BERT_NOT_IN_CHECKPOINT),
}


def _build_imported(cfg, kind: str, folder: str, tokenizer, seed, dtype, allow) -> Model:
  """`model_io.build_with_weights` with the `kind` import of `folder` (`allow`: more weights
  it may leave at their initial values); the rest initialised from `seed` (default the
  config's)."""
  cfg = model_io.with_compute_dtype(cfg, dtype)
  if seed is not None and int(cfg.get("seed", 0)) != int(seed):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.seed = int(seed)
  importer, not_in_checkpoint = _IMPORTERS[kind]
  fill = lambda m: importer(m, cfg.model, folder, allow=not_in_checkpoint + allow)
  module, report = model_io.build_with_weights(cfg, fill)
  _log_report(kind, folder, report)
  return Model(module, cfg, tokenizer, report)


def _log_report(kind: str, folder: str, report: ImportReport) -> None:
  logging.info(
    "%s import from %s: %d weights loaded, %d kept their initial values (%s)",
    kind,
    folder,
    len(report.loaded),
    len(report.kept_at_init),
    ", ".join(sorted({p.split("/")[0] for p in report.kept_at_init})) or "none",
  )


def resolve_config(config: ml_collections.ConfigDict | str | None) -> ml_collections.ConfigDict:
  """A full configuration from a ConfigDict, `"PATH.py[:ARG]"`, or None (the paper's), through
  the one loader (`config_lib.load`)."""
  return config_lib.load(DEFAULT_CONFIG if config is None else config)
