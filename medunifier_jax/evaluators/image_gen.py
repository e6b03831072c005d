"""Text-to-image evaluation: FID and KID against real test images, and finding fidelity.

Images are drawn by the text-conditioned prior (`medunifier_jax/prior/`) for held-out reports,
the pre-training data's `split` (test), and scored beside baselines computed in the same run:

  conditional     the prior of `prior_dir` (default WORKDIR/prior), one image per held-out report
  unconditional   a prior trained with `model.condition="none"` (`uncond_prior_dir`, default
                  WORKDIR/prior_uncond), one image per held-out report (the text is ignored);
                  when there is none, `null_condition`: the text prior sampled with its learned
                  null condition (the unconditional half of classifier-free guidance) instead
  reconstruction  `Model.reconstruct` of each real test image with its report: the VQ codes of
                  the real image decoded, the best any prior over these codes can do
  code_grid_mean  each real test image averaged over the cells of the bottom code grid
                  (`vqvae.grid`, e.g. 8 x 8 cells of 6 x 6 pixels) and resized back
                  (bilinear): what an image holding one grey level per bottom code keeps, the
                  yardstick for how much detail the reconstructions carry below a code's cell
  real_train      real images of `train_split`: the floor two real samples reach
  real_test       the real test images themselves: FID against themselves is 0 up to rounding
                  (a check of the pipeline), fidelity the reference

Every set holds `num_images` images (the first of each split). Scores:

- FID and KID (`image_metrics`) between the set's Inception-v3 pool features (2048-d) and those
  of the real test images. Protocol: images in [0, 1] (grayscale replicated to 3 channels),
  rounded to 8-bit levels, resized to 299 x 299 with the 2015 Inception graph's bilinear resize
  (no antialiasing), mapped to [-1, 1) by (v - 128) / 128; weights converted once from the FID
  Inception (`weights/inception_import.py`) into `inception_cache` (default
  `~/.cache/medunifier_jax/fid_inception`, or `$XDG_CACHE_HOME/medunifier_jax/fid_inception`).
  FID is biased at small N (two samples of one distribution score above 0, less as N grows), so
  each set reports `n_real` and `n_generated` beside it, and the unbiased KID (mean and spread
  over `kid_subsets` random subsets of `kid_subset_size`).
- Finding fidelity: a classifier trained on real images of `train_split` with their finding
  labels (the configured ViT with a linear head, `supervised.SupervisedEncoder`,
  `classifier_steps` steps; cached in `classifier_dir`, default WORKDIR/eval/
  fidelity_classifier) reads every image, and the ROC AUC of each finding's logit against the
  requested labels says whether the finding asked for is there. Two request sets:
    reports_auc   the held-out reports (requested = the test labels); real_test is the
                  reference, unconditional should sit at chance (0.5)
    prompts_auc   templated single-finding reports (`data/reports.py` phrasing; one prompt
                  states no finding: "no acute ..."): `prompts_per_finding` prompts per finding
                  in `findings`, `samples_per_prompt` images each; with `prompt_phantoms`, the
                  real and reconstruction sets use phantoms rendered with exactly the prompt's
                  finding (on as many anatomies as samples)
  with the mean over findings that have both classes (`*_auc_mean`) and the count (`n_reports`,
  `n_prompts`). The classifier's own validation AUC (on `val_split`) is reported under
  `fidelity_classifier`.

Nothing is chosen on the test split: sampling settings (`sample_steps`, `guidance`,
`temperature`, `seed`) are fixed in the config, the classifier trains on the training split.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from medunifier_jax import paths
from medunifier_jax.data import findings as findings_lib
from medunifier_jax.evaluators import common, image_metrics

# Column order of the results (absent sets are left out).
SET_ORDER = (
  "conditional",
  "unconditional",
  "null_condition",
  "reconstruction",
  "code_grid_mean",
  "real_train",
  "real_test",
)
CLASSIFIER_SET = "fidelity_classifier"
CLASSIFIER_WEIGHTS = "weights.npz"
CLASSIFIER_INFO = "classifier.json"
CLASSIFIER_VERSION = 1
# Seed stream of the prompt phantoms, apart from every data set's (seed, set code, split).
PROMPT_STREAM = 7001


def default_inception_cache() -> str:
  """Where the converted FID Inception weights live when `inception_cache` is unset: one copy
  per user (87 MB), not per workdir."""
  return paths.user_cache_dir("fid_inception")


@functools.lru_cache(maxsize=2)
def load_inception(cache_dir: str):
  """The FID Inception-v3 from `cache_dir`, converted there first if needed (needs torch once)."""
  from medunifier_jax.weights import inception_import

  return inception_import.load_inception(inception_import.ensure_cache(cache_dir))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """(..., S, S, 3) in [0, 1] -> (..., S, S) uint8 gray (channel mean), for figures."""
  return np.round(np.clip(np.asarray(images).mean(-1), 0.0, 1.0) * 255.0).astype(np.uint8)


# -- the single-finding prompts ----------------------------------------------------------------


def _cell_weights(size: int, grid: int) -> np.ndarray:
  """(grid, size): row i weighs each pixel by the part of it inside cell i (cells of size /
  grid pixels, which need not be whole: the decoder's sizes, (grid - 2) * 2^k, often are not
  multiples of the grid), divided by the cell's size, so that a row sums to 1."""
  edges = np.arange(grid + 1) * size / grid
  pixels = np.arange(size)
  inside = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
  return np.clip(inside, 0.0, None) * grid / size


@functools.partial(jax.jit, static_argnums=1)
def code_grid_mean(images: jax.Array, grid: int) -> jax.Array:
  """(B, S, S, C) -> (B, S, S, C): each of grid x grid cells replaced by its mean, resized back
  bilinearly."""
  w = jnp.asarray(_cell_weights(images.shape[1], grid), images.dtype)
  cells = jnp.einsum("ip,bpqc,jq->bijc", w, images, w, precision=jax.lax.Precision.HIGHEST)
  return jax.image.resize(cells, images.shape, "bilinear")


class FindingPrompts:
  """A source of single-finding prompts: for each finding, `prompts_per_finding` templated
  reports that state it (an empty finding list for "No Finding": a normal report), each repeated
  `samples_per_prompt` times, paired with a phantom that shows exactly that finding (a new
  anatomy per sample).

  Records follow the data sources' form (`image` uint8 (S, S), `report`, `labels` (F,), `id`);
  row i is prompt i // samples_per_prompt. With `render=False` the images are blank (for
  generation only) and nothing is rendered.
  """

  def __init__(
    self,
    names,
    prompts_per_finding: int,
    samples_per_prompt: int,
    size: int,
    seed: int,
    render: bool = True,
  ):
    from medunifier_jax.data import phantoms, reports

    self.size, self.render = int(size), bool(render)
    self.samples, self.per_finding = int(samples_per_prompt), int(prompts_per_finding)
    if self.samples < 1 or int(prompts_per_finding) < 1:
      raise ValueError("prompts_per_finding and samples_per_prompt must be at least 1")
    self.stream = (int(seed), PROMPT_STREAM)
    self.names: list[str] = []  # per prompt: the finding it states
    self.findings: list[tuple] = []  # per prompt: the phantoms.Finding drawn
    self.texts: list[str] = []
    for f, name in enumerate(names):
      findings_lib.finding_index(name)  # unknown names raise, listing the known ones
      for p in range(int(prompts_per_finding)):
        rng = np.random.default_rng([*self.stream, f, p])
        drawn = () if name == "No Finding" else (phantoms.sample_finding(name, rng),)
        self.names.append(name)
        self.findings.append(drawn)
        self.texts.append(reports.templated_report(drawn, rng))

  def __len__(self) -> int:
    return len(self.texts) * self.samples

  def first_prompts(self) -> list[int]:
    """The first prompt of each finding (prompts are grouped by finding, in order)."""
    return list(range(0, len(self.texts), self.per_finding))

  def grid_rows(self) -> np.ndarray:
    """Record indices of the first prompt of each finding, all its samples, sorted."""
    return np.asarray(
      [j * self.samples + s for j in self.first_prompts() for s in range(self.samples)]
    )

  def __getitem__(self, i: int) -> dict:
    from medunifier_jax.data import phantoms

    if not 0 <= i < len(self):
      raise IndexError(f"prompt row {i} outside the {len(self)} rows")
    j, s = divmod(int(i), self.samples)
    if self.render:
      phantom = phantoms.make_phantom((*self.stream, j), s, self.size, self.findings[j])
      image, labels = phantom.image, phantom.labels
    else:
      image, labels = np.zeros((self.size, self.size), np.uint8), None
    if labels is None:
      labels = phantoms.labels_for(self.findings[j])
    return {"image": image, "report": self.texts[j], "labels": labels, "id": f"prompt{j}/sample{s}"}


# -- the fidelity classifier -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _classify(graphdef, state, images, mean, std):
  """(B, S, S, 3) in [0, 1] -> (B, F) finding logits; the images rounded to 8-bit levels and
  normalised as the data pipeline does, so every set is read as a PNG of it would be."""
  x = jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0) / 255.0
  return nnx.merge(graphdef, state)((x - mean) / std)


class FidelityClassifier:
  """The supervised reference (`supervised.SupervisedEncoder`: the configured ViT and
  a linear head over the findings) trained on real images, as a reader of generated ones.

  Attributes:
    info: the settings it was trained with, its validation AUCs and how long it took.
  """

  def __init__(self, module, info: dict[str, Any], data_config):
    self.graphdef, self.state = nnx.split(module)
    self.info = info
    self._mean = jnp.asarray(data_config.image_mean, jnp.float32)
    self._std = jnp.asarray(data_config.image_std, jnp.float32)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) in [0, 1] -> (B, F) float32 (one compilation per batch shape)."""
    return np.asarray(
      _classify(self.graphdef, self.state, jnp.asarray(images, jnp.float32), self._mean, self._std)
    )

  @staticmethod
  def settings(config, split: str, steps: int, batch_size: int) -> dict[str, Any]:
    """What a cached classifier must have been trained with to be reused."""
    return json.loads(
      json.dumps(
        {
          "version": CLASSIFIER_VERSION,
          "vit": config.model.vit.to_dict(),
          "data": config.data.to_dict(),
          "split": split,
          "steps": int(steps),
          "batch_size": int(batch_size),
          "seed": int(config.seed),
          "learning_rate": float(config.learning_rate),
          "warmup_steps": int(config.warmup_steps),
          "weight_decay": float(config.weight_decay),
        },
        default=list,
        sort_keys=True,
      )
    )

  @classmethod
  def load(cls, folder: str, settings: dict[str, Any], config) -> FidelityClassifier | None:
    """The classifier cached in `folder` when it was trained with `settings`, else None."""
    from medunifier_jax.supervised import SupervisedEncoder

    info_path = os.path.join(folder, CLASSIFIER_INFO)
    weights_path = os.path.join(folder, CLASSIFIER_WEIGHTS)
    if not (os.path.isfile(info_path) and os.path.isfile(weights_path)):
      return None
    with open(info_path) as f:
      info = json.load(f)
    if info.get("settings") != settings:
      return None  # trained otherwise (another size, data or step count): train again
    graphdef, state = nnx.split(
      nnx.eval_shape(
        lambda: SupervisedEncoder(config.model.vit, findings_lib.NUM_FINDINGS, rngs=nnx.Rngs(0))
      )
    )
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    with np.load(weights_path) as saved:
      names = {"/".join(map(str, k)): k for k in flat}
      if set(saved.files) != set(names):
        return None
      values = {}
      for name, key in names.items():
        value = saved[name]
        if value.shape != tuple(flat[key].shape):
          return None
        values[key] = jnp.asarray(value, flat[key].dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return cls(nnx.merge(graphdef, state), dict(info, cached=True), config.data)

  def save(self, folder: str) -> None:
    """Writes the weights and `info` to `folder` (each file written whole, then renamed)."""
    os.makedirs(folder, exist_ok=True)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(self.state))
    arrays = {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}
    tmp = os.path.join(folder, f".{CLASSIFIER_WEIGHTS}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, os.path.join(folder, CLASSIFIER_WEIGHTS))
    tmp = os.path.join(folder, f".{CLASSIFIER_INFO}.tmp")
    with open(tmp, "w") as f:
      json.dump({k: v for k, v in self.info.items() if k != "cached"}, f, indent=1)
    os.replace(tmp, os.path.join(folder, CLASSIFIER_INFO))

  @classmethod
  def train(
    cls, config, tokenizer, settings: dict[str, Any], *, val_source, show_progress: bool = True
  ) -> FidelityClassifier:
    """Trains on `settings["split"]` of the pre-training data with the configuration's optimiser
    (learning rate, warm-up, decay, clipping), `steps` steps of `batch_size`; then scores the
    validation source (real images) for the record."""
    from tqdm.auto import tqdm

    from medunifier_jax.data import pipeline
    from medunifier_jax.supervised import auc_per_finding, new_encoder, train_step

    start = time.perf_counter()
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.batch_size, cfg.num_steps = int(settings["batch_size"]), int(settings["steps"])
    # The optimizer's schedule follows cfg: this run's step count, not pre-training's.
    module, optimizer = new_encoder(cfg)
    batches = iter(
      pipeline.train_dataset(cfg, tokenizer, split=settings["split"], shard_index=0, shard_count=1)
    )
    first = next(batches)
    if "labels" not in first:
      raise ValueError(
        f"data set {config.data.name!r} has no finding labels: the fidelity "
        "classifier is trained on them"
      )
    loss = None
    for step in tqdm(
      range(cfg.num_steps), desc="fidelity classifier", leave=False, disable=not show_progress
    ):
      batch = first if step == 0 else next(batches)
      loss = train_step(
        module, optimizer, jnp.asarray(batch["image"]), jnp.asarray(batch["labels"])
      )
    classifier = cls(module, {}, config.data)
    labels, logits = [], []
    for batch in common.EvalBatches(config, tokenizer, val_source, int(settings["batch_size"])):
      keep = batch["mask"].astype(bool)
      logits.append(classifier.logits(batch["target_image"])[keep])
      labels.append(batch["labels"][keep])
    aucs = auc_per_finding(np.concatenate(labels), np.concatenate(logits))
    classifier.info = {
      "settings": settings,
      "final_loss": None if loss is None else float(loss),
      "validation_auc": aucs,
      "validation_auc_mean": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
      "validation_n": int(sum(len(x) for x in labels)),
      "seconds": round(time.perf_counter() - start, 1),
      "cached": False,
    }
    return classifier


# -- image sets --------------------------------------------------------------------------------


def _has_prior(folder: str) -> bool:
  """Whether `folder` holds a prior run with a finished checkpoint (one still starting, without
  any, is treated as absent)."""
  from etils import epath

  from medunifier_jax.prior import sample as prior_sample

  checkpoints = epath.Path(folder) / "checkpoints"
  return (
    prior_sample.is_prior_workdir(folder)
    and checkpoints.exists()
    and any(p.name.isdigit() for p in checkpoints.iterdir())
  )


class ImageGenEvaluator(common.Evaluator):
  """Settings (`config.evals.image_gen`): see the module docstring and configs/pretrain.py.

  `workdir` (set by `evaluate.evaluate` through `registry.bind_workdir`) is where the priors
  and the cached classifier are looked up by default; without one, only explicitly configured
  folders are used and the classifier is trained in memory.
  """

  task = "image_gen"
  workdir: str | None = None

  def __init__(self, config, task_config, tokenizer):
    super().__init__(config, task_config, tokenizer)

    if len(self.datasets) != 1:
      raise ValueError(
        "config.evals.image_gen.datasets names one data set (the pre-training "
        f"data whose held-out reports are drawn), got {self.datasets}"
      )
    cfg = self.cfg
    # User folders enter here, resolved once against the directory the run started in.
    resolve = lambda p: paths.resolve(p) if p else ""
    self.prior_dir = resolve(cfg.prior_dir)
    self.uncond_prior_dir = resolve(cfg.uncond_prior_dir)
    self.classifier_dir = resolve(cfg.classifier_dir)
    self.inception_cache = resolve(cfg.inception_cache) or default_inception_cache()
    self.findings = tuple(cfg.findings) or findings_lib.FINDINGS
    self.used: dict[str, str] = {}  # set name -> where its images came from (after run)

  # -- settings and description ----------------------------------------------------------------

  def settings(self) -> dict:
    out = super().settings()
    out.update(
      inception_cache=self.inception_cache, findings=list(self.findings), sets=dict(self.used)
    )
    return out

  def describe(self) -> str:
    return (
      f"FID/KID: Inception-v3 pool features at 299 px against the real {self.cfg.split} "
      "images (n_real, n_generated: the sample sizes; FID is biased at small N, compare "
      "only at equal N); fidelity: AUC of a classifier trained on real "
      f"{self.cfg.train_split} images for the requested findings"
    )

  # -- what the run uses -----------------------------------------------------------------------

  def _folder(self, configured: str, name: str) -> str:
    if configured:
      return configured
    return os.path.join(self.workdir, name) if self.workdir else ""

  def load_priors(self) -> dict[str, Any]:
    """{"conditional": TrainedPrior, "unconditional" | "null_condition": ...}, whatever exists.

    A configured folder without a trained prior is an error; a missing default one is skipped
    with a warning naming the command that trains it.
    """
    from absl import logging

    from medunifier_jax.prior import sample as prior_sample

    out: dict[str, Any] = {}
    cond_dir, prior = self._trained_prior(
      self.prior_dir, "prior", "text", "an unconditional prior is set as uncond_prior_dir"
    )
    if prior is not None:
      out["conditional"] = prior
      drafts = int(self.cfg.get("candidates", 1))
      self.used["conditional"] = f"text prior {cond_dir} (step {prior.step})" + (
        f", each image the best of {drafts} drafts by the model's ITM score" if drafts > 1 else ""
      )
    else:
      logging.warning(
        "image_gen: no text prior in %s: only the baselines are scored; train one with\n  %s",
        cond_dir or "(no workdir)",
        prior_sample.train_command(self.workdir or "WORKDIR"),
      )
    uncond_dir, prior = self._trained_prior(
      self.uncond_prior_dir,
      "prior_uncond",
      "none",
      "the unconditional baseline is a prior trained with --config.model.condition=none",
    )
    if prior is not None:
      out["unconditional"] = prior
      self.used["unconditional"] = f"unconditional prior {uncond_dir} (step {prior.step})"
    elif "conditional" in out:
      out["null_condition"] = out["conditional"]
      self.used["null_condition"] = (
        f"the text prior {cond_dir} sampled with its learned null "
        "condition (no prior trained with condition=none found)"
      )
    return out

  def _trained_prior(self, configured: str, name: str, condition: str, advice: str):
    """(folder, prior): the prior in the `configured` folder, else in WORKDIR/`name` when that
    holds a finished one (prior None when there is none). A prior that does not fit this model's
    configuration, or was not trained with model.condition == `condition` ("text" or "none"), is
    refused; `advice` ends that error."""
    from medunifier_jax.prior import sample as prior_sample

    folder = self._folder(configured, name)
    if not folder or not (configured or _has_prior(folder)):
      return folder, None
    prior = prior_sample.load_prior(folder)
    prior.check_fits(self.config)
    if prior.module.condition != condition:
      raise ValueError(
        f"the prior in {folder} has model.condition={prior.module.condition!r}, "
        f"not {condition!r}: {advice}"
      )
    return folder, prior

  def fidelity_classifier(self, show_progress: bool = True) -> FidelityClassifier:
    """The cached classifier when its settings match, else a newly trained one (then cached)."""
    cfg = self.cfg
    settings = FidelityClassifier.settings(
      self.config, cfg.train_split, int(cfg.classifier_steps), int(cfg.classifier_batch_size)
    )
    folder = self._folder(self.classifier_dir, os.path.join("eval", "fidelity_classifier"))
    if folder:
      cached = FidelityClassifier.load(folder, settings, self.config)
      if cached is not None:
        return cached
    # Scored on the whole validation split: classifying real phantoms costs little.
    classifier = FidelityClassifier.train(
      self.config,
      self.tokenizer,
      settings,
      val_source=self.source(self.datasets[0], cfg.val_split),
      show_progress=show_progress,
    )
    if folder and jax.process_index() == 0:
      classifier.save(folder)
    return classifier

  # -- scoring ---------------------------------------------------------------------------------

  def _generator(self, prior, kind: str, graphdef, state, seed: int) -> Callable:
    """`(batch, row_offset) -> (B, S, S, 3)` images of one prior for the batch's reports."""
    from medunifier_jax.prior import sample as prior_sample

    cfg = self.cfg
    steps, temperature = int(cfg.sample_steps), float(cfg.temperature)
    candidates = int(cfg.get("candidates", 1))
    pixel_stats = prior_sample.pixel_stats(self.config)
    choice = float(prior.config.sample.choice_temperature)
    null = kind == "null_condition"

    def draw(batch, offset):
      return prior.generate(
        graphdef,
        state,
        batch["input_ids"],
        batch["attention_mask"],
        seed=seed,
        steps=steps,
        guidance=0.0 if null else float(cfg.guidance),
        temperature=temperature,
        choice_temperature=choice,
        row_offset=offset,
        null_condition=null,
        # The baselines draw once: best-of-k by the report would make them text-aware.
        candidates=1 if null else candidates,
        pixel_stats=pixel_stats,
      )["images"]

    return draw

  def _score(
    self,
    source,
    makers: dict[str, Callable],
    *,
    inception,
    classifier,
    examples: np.ndarray,
    desc: str,
    timings: dict[str, float],
  ) -> dict[str, dict[str, Any]]:
    """Runs every image maker over the source's records, batch by batch.

    Returns per set name: `features` (n, 2048) when `inception` is given, `logits` (n, F) when
    `classifier` is, `labels` (n, F) requested (the records' labels) and `examples`: the images
    of the rows `examples` (sorted record indices) as uint8 (e, S, S).
    """
    from tqdm.auto import tqdm

    cfg = self.cfg
    parts: dict[str, dict[str, list]] = {name: {} for name in makers}
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.batch_size))
    offset = 0
    for batch in tqdm(batches, desc=desc, leave=False):
      keep = batch["mask"].astype(bool)
      rows = np.arange(offset, offset + len(keep))
      shown = keep & np.isin(rows, examples)
      for name, make in makers.items():
        start = time.perf_counter()
        images = np.asarray(make(batch, offset), np.float32)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        got = parts[name]
        if inception is not None:
          start = time.perf_counter()
          # The whole padded batch: one compiled shape; padding rows are dropped after.
          feats = image_metrics.inception_features(inception, images, batch_size=len(images))
          got.setdefault("features", []).append(feats[keep])
          timings["inception"] = timings.get("inception", 0.0) + time.perf_counter() - start
        if classifier is not None:
          start = time.perf_counter()
          got.setdefault("logits", []).append(classifier.logits(images)[keep])
          timings["classifier"] = timings.get("classifier", 0.0) + time.perf_counter() - start
        if "labels" in batch:
          got.setdefault("labels", []).append(batch["labels"][keep])
        got.setdefault("examples", []).append(to_uint8(images[shown]))
      offset += len(keep)
    return {name: {k: np.concatenate(v) for k, v in got.items()} for name, got in parts.items()}

  @staticmethod
  def _fidelity(prefix: str, labels: np.ndarray, logits: np.ndarray) -> Iterator[tuple[str, float]]:
    from medunifier_jax.supervised import auc_per_finding

    aucs = auc_per_finding(labels, logits)
    yield f"{prefix}_auc_mean", float(np.mean(list(aucs.values()))) if aucs else float("nan")
    yield f"n_{prefix}", float(len(labels))
    for name, value in aucs.items():
      yield f"{prefix}_auc/{name}", value

  def run(self, model) -> Iterator[tuple[str, float]]:
    """Yields `("{set}/{metric}", value)` for the sets of the module docstring, then
    `("fidelity_classifier/...", value)`."""
    graphdef, state = common.split_model(model)
    cfg, dataset = self.cfg, self.datasets[0]
    self.used = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    priors = self.load_priors()
    classifier = self.fidelity_classifier()
    timings["classifier_training"] = (
      0.0 if classifier.info.get("cached") else float(classifier.info["seconds"])
    )
    start_inception = time.perf_counter()
    inception = load_inception(self.inception_cache)
    timings["inception_load"] = time.perf_counter() - start_inception

    test = self.source(dataset, cfg.split)
    test = common.Subset(test, int(cfg.num_images) or len(test))
    train = self.source(dataset, cfg.train_split)
    train = common.Subset(train, len(test))
    real = lambda batch, offset: batch["target_image"]
    grid = int(self.config.model.vqvae.grid)
    grid_mean = lambda batch, offset: np.asarray(
      code_grid_mean(jnp.asarray(batch["target_image"], jnp.float32), grid)
    )
    recon = lambda batch, offset: np.asarray(
      self.fns(graphdef).reconstruct(
        state, batch["image"], batch["input_ids"], batch["attention_mask"]
      )["recon"]
    )
    generated = {
      name: self._generator(prior, name, graphdef, state, int(cfg.seed))
      for name, prior in priors.items()
    }
    self.used.update(
      reconstruction=f"Model.reconstruct of the {cfg.split} images",
      code_grid_mean=f"the {cfg.split} images averaged over {grid} x {grid} cells",
      real_train=f"{dataset}/{cfg.train_split}, first {len(train)}",
      real_test=f"{dataset}/{cfg.split}, first {len(test)}",
    )

    shown = np.arange(int(cfg.num_examples))
    held_out = self._score(
      test,
      {**generated, "reconstruction": recon, "code_grid_mean": grid_mean, "real_test": real},
      inception=inception,
      classifier=classifier,
      examples=shown,
      desc="image_gen: held-out reports",
      timings=timings,
    )
    held_out.update(
      self._score(
        train,
        {"real_train": real},
        inception=inception,
        classifier=None,
        examples=shown,
        desc="image_gen: real training images",
        timings=timings,
      )
    )
    prompts = FindingPrompts(
      self.findings,
      int(cfg.prompts_per_finding),
      int(cfg.samples_per_prompt),
      int(self.config.data.image_size),
      int(cfg.seed),
      render=bool(cfg.prompt_phantoms),
    )
    prompt_makers = {
      name: self._generator(prior, name, graphdef, state, int(cfg.seed) + 1)
      for name, prior in priors.items()
    }
    if cfg.prompt_phantoms:
      prompt_makers.update(reconstruction=recon, code_grid_mean=grid_mean, real_test=real)
    by_prompt = {}
    if prompt_makers:
      by_prompt = self._score(
        prompts,
        prompt_makers,
        inception=None,
        classifier=classifier,
        examples=prompts.grid_rows(),
        desc="image_gen: finding prompts",
        timings=timings,
      )

    reference = held_out["real_test"]["features"]
    for name in SET_ORDER:
      if name not in held_out:
        continue
      scores = image_metrics.image_scores(
        reference,
        held_out[name]["features"],
        subsets=int(cfg.kid_subsets),
        subset_size=int(cfg.kid_subset_size),
        seed=int(cfg.seed),
      )
      for metric in ("fid", "kid_mean", "kid_std", "n_real", "n_generated"):
        yield f"{name}/{metric}", float(scores[metric])
      if "logits" in held_out[name]:
        for metric, value in self._fidelity(
          "reports", held_out[name]["labels"], held_out[name]["logits"]
        ):
          yield f"{name}/{metric}", float(value)
      if name in by_prompt:
        for metric, value in self._fidelity(
          "prompts", by_prompt[name]["labels"], by_prompt[name]["logits"]
        ):
          yield f"{name}/{metric}", float(value)
    info = classifier.info
    yield f"{CLASSIFIER_SET}/validation_auc_mean", float(info["validation_auc_mean"])
    yield f"{CLASSIFIER_SET}/n_validation", float(info["validation_n"])
    yield f"{CLASSIFIER_SET}/train_steps", float(info["settings"]["steps"])
    timings["total"] = time.perf_counter() - start
    self.outputs[dataset] = self._outputs(held_out, by_prompt, test, prompts, info, priors, timings)

  def _outputs(
    self, held_out, by_prompt, test, prompts: FindingPrompts, info, priors, timings
  ) -> dict[str, Any]:
    """What the report draws: example images per set, the prompt grid, provenance, timings."""
    e = int(self.cfg.num_examples)
    out: dict[str, Any] = {}
    for name, got in held_out.items():
      out[f"held_out_{name}"] = got["examples"]
    out["held_out_reports"] = [test[i]["report"] for i in range(min(e, len(test)))]
    first = prompts.first_prompts()
    for name, got in by_prompt.items():
      # (findings, samples, S, S): row f holds the samples of finding f's first prompt.
      out[f"grid_{name}"] = got["examples"].reshape(
        (len(first), prompts.samples) + got["examples"].shape[1:]
      )
    out["grid_prompts"] = [prompts.texts[j] for j in first]
    out["grid_findings"] = [prompts.names[j] for j in first]
    out["sets"] = dict(self.used)
    out["classifier"] = {k_: v for k_, v in info.items() if k_ != "settings"}
    out["priors"] = {
      name: {
        "workdir": p.workdir,
        "step": p.step,
        "medunifier_step": int(p.config.get("medunifier_step", -1)),
        "condition": p.module.condition,
      }
      for name, p in priors.items()
    }
    out["seconds"] = {k_: round(v, 1) for k_, v in timings.items()}
    return out
