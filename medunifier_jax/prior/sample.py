"""Images from reports: parallel decoding of the prior's codes, then the frozen VQ-VAE decoder.

Decoding (B rows, N = (g/2)^2 + g^2 codes, T steps), under one `jax.jit` with a
`lax.fori_loop`: every code starts as [MASK]; at step t the prior predicts every position, a
code is drawn for each masked one (softmax of logits / temperature), and of those the most
confident are kept so that ceil(N cos(pi/2 (t + 1) / T)) stay masked (`mask_schedule`; none
after the last step). The confidence is the drawn code's log-probability plus Gumbel noise
scaled by choice_temperature * (1 - (t + 1) / T), which varies the order early and fades out.
Codes once kept are final.

Classifier-free guidance: logits = cond + g (cond - uncond), the unconditional logits from the
prior's learned null condition; g = 0 gives exactly the conditional logits. Each row draws from
its own key, fold_in(key(seed), row), so a row's sample depends on the seed and its row index
only, not on the batch around it.

Best of k (`candidates` > 1, text-conditioned rows only): each row draws k candidates (the
first from the row's own key, so k = 1 is the single draw; candidate j from fold_in(key, j)),
and the frozen MedUnifier keeps the one whose image its image-text matching head (ITM) scores
highest against the row's report: the understanding half judging the generative half's drafts.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax import config_lib
from medunifier_jax.prior.model import CodePrior, unflatten_codes


def mask_schedule(n: int, steps: int) -> np.ndarray:
  """(steps,) int32: codes still masked after each step, ceil(n cos(pi/2 (t + 1) / steps)),
  at least one fewer per step and 0 after the last (cos(pi/2) is not exactly 0 in floats)."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  counts, previous = [], n
  for t in range(steps):
    c = 0 if t == steps - 1 else math.ceil(n * math.cos(0.5 * math.pi * (t + 1) / steps))
    previous = max(0, min(c, previous - 1))
    counts.append(previous)
  return np.asarray(counts, np.int32)


def row_keys(seed: int, rows: int, offset: int = 0) -> jax.Array:
  """(rows,) keys: fold_in(key(seed), offset + i) for row i."""
  base = jax.random.key(int(seed))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + rows))


def sample_codes(
  prior: CodePrior,
  text_states: jax.Array | None,
  text_mask: jax.Array | None,
  keys: jax.Array,
  *,
  steps: int,
  guidance: jax.Array | float | None,
  temperature: jax.Array | float = 1.0,
  choice_temperature: jax.Array | float = 4.5,
) -> jax.Array:
  """Parallel decoding (module docstring); call under `jax.jit`.

  Args:
    prior: the trained prior (deterministic: no dropout).
    text_states: (B, T, H) the Q-Former's text-mode states, or None: unconditional.
    text_mask: (B, T) their attention mask.
    keys: (B,) one PRNG key per row (`row_keys`).
    steps: decoding steps (static).
    guidance: None: the conditional logits only (one prior pass per step); a number: classifier
      -free guidance with that weight (two passes).
    temperature: of the code draws (> 0).
    choice_temperature: scale of the Gumbel noise on the confidences at step 0.
  Returns:
    (B, N) int32 codes in [0, K), the top grid first (`model.unflatten_codes`).
  """
  b, n = keys.shape[0], prior.num_positions
  schedule = jnp.asarray(mask_schedule(n, steps))
  temperature = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  guided = guidance is not None and text_states is not None and prior.condition == "text"

  def logits_of(tokens):
    logits = prior(tokens, text_states, text_mask)
    if guided:
      uncond = prior(tokens, None, None)
      logits = logits + jnp.asarray(guidance, jnp.float32) * (logits - uncond)
    return logits / temperature

  def step(t, tokens):
    masked = tokens == prior.mask_id
    logp = jax.nn.log_softmax(logits_of(tokens), axis=-1)  # (B, N, K)
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, t)))(keys)  # (B, 2)
    drawn = jax.vmap(jax.random.categorical)(step_keys[:, 0], logp).astype(jnp.int32)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (n,)))(step_keys[:, 1])
    scale = choice_temperature * (1.0 - (t + 1.0) / steps)
    confidence = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0] + scale * noise
    # Codes already kept are never masked again.
    confidence = jnp.where(masked, confidence, jnp.inf)
    ranks = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)
    remask = ranks < schedule[t]
    tokens = jnp.where(masked, drawn, tokens)
    return jnp.where(remask, prior.mask_id, tokens)

  start = jnp.full((b, n), prior.mask_id, jnp.int32)
  return jax.lax.fori_loop(0, steps, step, start)


class SamplingSettings(NamedTuple):
  """The decoding settings of `sample_codes` that change per call, not per compilation: a
  pytree of (traced) scalars that crosses `jax.jit` as an argument."""

  guidance: jax.Array | float
  temperature: jax.Array | float
  choice_temperature: jax.Array | float


def candidate_keys(keys: jax.Array, k: int) -> jax.Array:
  """(B,) row keys -> (B k,): row i's candidate j at i k + j draws from keys[i] (j = 0) or
  fold_in(keys[i], j)."""

  def per_row(key):
    more = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(1, k))
    return jnp.concatenate([key[None], more])

  return jax.vmap(per_row)(keys).reshape(-1)


def pixel_stats(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The MedUnifier's image normalisation, ((3,) mean, (3,) std) float32, from its config's
  `data.image_mean` / `data.image_std` (what `match_scores` needs)."""
  return tuple(jnp.asarray(v, jnp.float32) for v in (config.data.image_mean, config.data.image_std))


def match_scores(medunifier, images, input_ids, attention_mask, pixel_stats) -> jax.Array:
  """Images (B, S, S, 3) in [0, 1] and their reports (B, T) -> (B,) float32: the MedUnifier's
  ITM log-probability that image and report match. `pixel_stats`: (mean, std) per channel,
  the data pipeline's normalisation (`config.data.image_mean` / `image_std`; arrays or
  sequences of 3 floats)."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in pixel_stats)
  tokens = medunifier.image_tokens((images - mean) / std)
  logits = medunifier.itm_logits(tokens, input_ids, attention_mask)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, 1]


def generate_fn(
  medunifier,
  prior: CodePrior,
  input_ids,
  attention_mask,
  keys,
  settings: SamplingSettings,
  *,
  steps: int,
  guided: bool,
  null_condition: bool = False,
  candidates: int = 1,
  pixel_stats: tuple[jax.Array, jax.Array] | None = None,
):
  """Reports' tokens (B, T) -> images (B, S, S, 3) float32 in [0, 1], codes_top (B, g/2, g/2),
  codes_bottom (B, g, g) or (B, g, g, R): the frozen Q-Former's text states, parallel decoding,
  the frozen VQ-VAE's decoder (evaluation mode). `settings.guidance` applies only when `guided`.
  `null_condition` ignores the reports and samples the text prior's learned null condition
  (its unconditional baseline). `candidates` > 1: the best of that many per row by the
  MedUnifier's ITM score (module docstring; needs `pixel_stats`); rows without text (null
  condition, an unconditional prior) draw once."""
  text = None
  if null_condition:
    attention_mask, guided = None, False
  elif prior.condition == "text":
    text = medunifier.text_hidden(input_ids, attention_mask)
  k = int(candidates)
  rerank = k > 1 and text is not None
  if rerank:
    if pixel_stats is None:
      raise ValueError(
        "candidates > 1 needs pixel_stats (`pixel_stats(config)` of the MedUnifier, whose ITM "
        "head scores the drafts)"
      )
    b = input_ids.shape[0]
    input_ids, attention_mask = jnp.repeat(input_ids, k, 0), jnp.repeat(attention_mask, k, 0)
    text, keys = jnp.repeat(text, k, 0), candidate_keys(keys, k)
  tokens = sample_codes(
    prior,
    text,
    attention_mask,
    keys,
    steps=steps,
    guidance=settings.guidance if guided else None,
    temperature=settings.temperature,
    choice_temperature=settings.choice_temperature,
  )
  top, bottom = unflatten_codes(tokens, prior.grid, prior.bottom_depth)
  images = jnp.clip(medunifier.vqvae.decode_codes(top, bottom).astype(jnp.float32), 0.0, 1.0)
  if rerank:
    scores = match_scores(medunifier, images, input_ids, attention_mask, pixel_stats)
    best = jnp.argmax(scores.reshape(b, k), axis=1) + jnp.arange(b) * k
    images, top, bottom = images[best], top[best], bottom[best]
  return images, top, bottom


class TrainedPrior:
  """A prior ready for sampling.

  Attributes:
    module: the `CodePrior`.
    config: its full run config (configs/prior.py); `config.sample` holds the decoding defaults.
    workdir: where it was trained (None when built in memory).
    step: the checkpoint step it was restored from.
  """

  def __init__(
    self,
    module: CodePrior,
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    step: int | None = None,
  ):
    self.module = module
    self.config = config
    self.workdir = workdir
    self.step = step
    self.graphdef, self.state = nnx.split(module)

  def generate(
    self,
    medunifier_graphdef: nnx.GraphDef,
    medunifier_state: nnx.State,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    temperature: float | None = None,
    choice_temperature: float | None = None,
    row_offset: int = 0,
    null_condition: bool = False,
    candidates: int | None = None,
    pixel_stats: tuple[jax.Array, jax.Array] | None = None,
  ) -> dict[str, np.ndarray]:
    """Rows of report tokens (B, T) -> `images` (B, S, S, 3) float32 in [0, 1], `codes_top`,
    `codes_bottom`; the MedUnifier is given as `(graphdef, state)` (`api.Model`'s).

    Unset decoding settings come from `config.sample`; row i draws from
    fold_in(key(seed), row_offset + i). `null_condition` samples the learned null condition
    instead of the reports (`generate_fn`). `candidates` > 1 keeps the best of that many per
    row by the MedUnifier's ITM score; `pixel_stats` is then the MedUnifier's image
    normalisation (`pixel_stats(config)`).
    """
    s = self.config.sample
    candidates = int(s.get("candidates", 1) if candidates is None else candidates)
    if candidates < 1:
      raise ValueError(f"candidates must be at least 1, got {candidates}")
    steps = int(s.steps if steps is None else steps)
    guidance = float(s.guidance if guidance is None else guidance)
    temperature = float(s.temperature if temperature is None else temperature)
    choice = float(s.choice_temperature if choice_temperature is None else choice_temperature)
    if temperature <= 0:
      raise ValueError(f"temperature must be positive, got {temperature}")
    keys = row_keys(seed, input_ids.shape[0], row_offset)
    # Without text (the unconditional prior) or with weight 0 the guidance term is exactly
    # zero: one prior pass per step suffices.
    guided = self.module.condition == "text" and guidance != 0.0
    from medunifier_jax import inference

    images, top, bottom = inference.generate_images(
      medunifier_graphdef,
      medunifier_state,
      self.graphdef,
      self.state,
      jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32),
      keys,
      SamplingSettings(jnp.float32(guidance), jnp.float32(temperature), jnp.float32(choice)),
      steps=steps,
      guided=guided,
      null_condition=bool(null_condition),
      candidates=candidates,
      pixel_stats=pixel_stats,
    )
    return {
      "images": np.asarray(images),
      "codes_top": np.asarray(top),
      "codes_bottom": np.asarray(bottom),
    }

  def check_fits(self, medunifier_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError when the prior's codes do not fit the MedUnifier's VQ-VAE."""
    vq = medunifier_config.model.vqvae
    m = self.config.model
    width = int(medunifier_config.model.qformer.hidden_size)
    got = (int(vq.grid), int(vq.codebook_size), config_lib.bottom_depth(vq), width)
    want = (int(m.grid), int(m.codebook_size), config_lib.bottom_depth(m), int(m.text_width))
    if got != want:
      raise ValueError(
        f"the prior in {self.workdir} was trained for grid {want[0]}, {want[1]} codes, "
        f"{want[2]} per bottom cell and text width {want[3]}, but this MedUnifier has grid "
        f"{got[0]}, {got[1]} codes, {got[2]} per bottom cell and width {got[3]}; train a prior "
        "on this model (python -m medunifier_jax.train "
        "--config configs/prior.py:demo --workdir W/prior --config.medunifier_workdir=W)"
      )


def is_prior_workdir(path: str) -> bool:
  """Whether `path` holds a prior run (config.json with task "prior")."""
  from etils import epath

  config = epath.Path(path) / "config.json"
  if not config.exists():
    return False
  import json

  return json.loads(config.read_text()).get("task") == "prior"


def _has_checkpoint(workdir: str) -> bool:
  from etils import epath

  folder = epath.Path(workdir) / "checkpoints"
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def load_prior(workdir: str) -> TrainedPrior:
  """The prior of a training workdir (its config.json and newest readable checkpoint; only the
  prior's weights are read, not a frozen text encoder's or the optimizer's).

  Raises:
    FileNotFoundError: no prior run or no checkpoint there.
  """
  from medunifier_jax import model_io

  if not is_prior_workdir(workdir):
    raise FileNotFoundError(f"{workdir} holds no trained prior (config.json with task 'prior')")
  restored = model_io.restore(workdir)
  return TrainedPrior(restored.module.prior, restored.config, restored.workdir, restored.step)


def train_command(workdir: str) -> str:
  """The command that trains a prior for the MedUnifier of `workdir` (for error messages)."""
  return (
    "python -m medunifier_jax.train --config configs/prior.py:demo "
    f"--workdir {os.path.join(workdir, 'prior')} --config.medunifier_workdir={workdir}"
  )


def attach_prior(model: Any, prior_dir: str | None, medunifier_workdir: str | None) -> None:
  """Sets `model.prior` (an `api.Model`): the prior of `prior_dir`, else of
  `MEDUNIFIER_WORKDIR/prior` when that holds one; a prior trained on another MedUnifier
  checkpoint step is loaded with a warning."""
  from absl import logging

  explicit = prior_dir is not None
  if not explicit:
    if medunifier_workdir is None:
      return
    prior_dir = os.path.join(medunifier_workdir, "prior")
    # A prior run that has not saved a checkpoint yet is not attached (and is no error).
    if not is_prior_workdir(prior_dir) or not _has_checkpoint(prior_dir):
      return
  try:
    prior = load_prior(prior_dir)
    prior.check_fits(model.config)
  except (FileNotFoundError, ValueError) as e:
    if explicit:
      raise
    # The model itself loads; only generate_images will say that there is no prior.
    logging.warning("the prior in %s is not attached: %s", prior_dir, e)
    return
  trained_on = int(prior.config.get("medunifier_step", -1))
  step = getattr(model, "checkpoint_step", None)
  if trained_on >= 0 and step is not None and trained_on != step:
    logging.warning(
      "the prior in %s was trained on the codes of MedUnifier step %d, this model "
      "is step %d: samples may not fit its decoder; train the prior again",
      prior_dir,
      trained_on,
      step,
    )
  model.prior = prior
