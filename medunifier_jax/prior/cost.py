"""What drawing an image from a report costs: FLOPs per image (ahead-of-time, nothing
allocated) and measured images per second.

A sampled image is one pass of the frozen Q-Former's text encoder over the report, `steps`
passes of the prior over all N = (g/2)^2 + g^2 code positions (two per step with classifier-free
guidance) and one pass of the VQ-VAE decoder (`sample.generate_fn`). The FLOPs are XLA's cost
analysis of each part compiled alone for one image, combined with those counts: a compiled
`fori_loop` is costed as one pass of its body, so the whole sampler's own figure would hide the
steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax import config_lib, inference, model_io
from medunifier_jax.prior import model as prior_model
from medunifier_jax.prior import sample
from medunifier_jax.prior.train import configure


def fitted_prior_config(
  prior_config: ml_collections.ConfigDict, medunifier_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """A copy of `prior_config` sized for `medunifier_config` (grid, codebook, text width), as
  training a prior on that MedUnifier's codes would make it."""
  config = ml_collections.ConfigDict(prior_config.to_dict())
  configure(config, medunifier_config)
  return config


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", float("nan")))


def sampling_flops(
  medunifier_config: ml_collections.ConfigDict,
  prior_config: ml_collections.ConfigDict,
  *,
  steps: int,
  guided: bool,
  candidates: int = 1,
) -> dict[str, float]:
  """FLOPs of drawing one image: `text_encoder`, `prior_pass` (one pass over the codes),
  `decoder`, and `per_image` = text + k (steps x (2 if guided else 1) x prior pass + decoder
  [+ judge]) for k = `candidates` drafts, `judge` (k > 1 only) being the MedUnifier's ViT and
  matching pass that score a draft. Built from shapes only (`model_io.build_abstract`), so
  paper sizes cost no memory."""
  prior_config = fitted_prior_config(prior_config, medunifier_config)
  mu_def, mu_state = nnx.split(model_io.build_abstract(medunifier_config))
  prior_def, prior_state = nnx.split(model_io.build_abstract(prior_config, inference=True).prior)
  t = int(medunifier_config.model.max_text_len)
  g = int(medunifier_config.model.vqvae.grid)
  depth = config_lib.bottom_depth(medunifier_config.model.vqvae)
  h = int(medunifier_config.model.qformer.hidden_size)
  n = sum(prior_model.num_codes(g, depth))
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  text = jax.ShapeDtypeStruct((1, t, h), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, n), jnp.int32)
  top = jax.ShapeDtypeStruct((1, g // 2, g // 2), jnp.int32)
  bottom = jax.ShapeDtypeStruct((1, *config_lib.bottom_codes_shape(g, depth)), jnp.int32)

  def text_encoder(state, ids, mask):
    return nnx.merge(mu_def, state).text_hidden(ids, mask)

  def prior_pass(state, tokens, text, mask):
    return nnx.merge(prior_def, state)(tokens, text, mask)

  def decoder(state, top, bottom):
    return nnx.merge(mu_def, state).vqvae.decode_codes(top, bottom)

  out = {
    "text_encoder": _flops(text_encoder, mu_state, ids, ids),
    "prior_pass": _flops(prior_pass, prior_state, tokens, text, ids),
    "decoder": _flops(decoder, mu_state, top, bottom),
  }
  k = int(candidates)
  draft = int(steps) * (2 if guided else 1) * out["prior_pass"] + out["decoder"]
  if k > 1:
    size = int(medunifier_config.model.vit.image_size)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    stats = (jnp.zeros(3, jnp.float32), jnp.ones(3, jnp.float32))

    def judge(state, image, ids, mask):
      return sample.match_scores(nnx.merge(mu_def, state), image, ids, mask, stats)

    out["judge"] = _flops(judge, mu_state, image, ids, ids)
    draft += out["judge"]
  out["per_image"] = out["text_encoder"] + k * draft
  out.update(steps=int(steps), guided=bool(guided), candidates=k, code_positions=n)
  return out


def sampling_speed(
  medunifier_config: ml_collections.ConfigDict,
  prior_config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  steps: int,
  guidance: float,
  candidates: int = 1,
  repeats: int = 5,
) -> dict[str, Any]:
  """Images per second of `inference.generate_images` on `batch_size` reports (each the best
  of `candidates` drafts), with randomly initialised models of these sizes (the cost does not
  depend on the weights); the median of `repeats` timed calls after one compiling call."""
  prior_config = fitted_prior_config(prior_config, medunifier_config)
  mu_def, mu_state = nnx.split(model_io.build(medunifier_config))
  prior = model_io.build(prior_config, inference=True).prior
  prior_def, prior_state = nnx.split(prior)
  t = int(medunifier_config.model.max_text_len)
  qf = medunifier_config.model.qformer
  rs = np.random.RandomState(0)
  ids = rs.randint(5, int(qf.dec_token_id), size=(batch_size, t)).astype(np.int32)
  ids[:, 0] = int(qf.cls_token_id)
  mask = np.ones_like(ids)
  keys = sample.row_keys(0, batch_size)
  guided = prior.condition == "text" and guidance != 0.0

  def draw():
    out = inference.generate_images(
      mu_def,
      mu_state,
      prior_def,
      prior_state,
      ids,
      mask,
      keys,
      sample.SamplingSettings(
        jnp.float32(guidance), jnp.float32(1.0), jnp.float32(prior_config.sample.choice_temperature)
      ),
      steps=steps,
      guided=guided,
      candidates=int(candidates),
      pixel_stats=sample.pixel_stats(medunifier_config),
    )
    return jax.block_until_ready(out)

  start = time.perf_counter()
  draw()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    draw()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
    "batch_size": batch_size,
    "steps": steps,
    "guided": guided,
    "candidates": int(candidates),
    "first_call_s": compile_s,
    "median_s": median,
    "images_per_s": batch_size / median,
  }
