"""The compiled inference functions: the one definition of every jitted model call.

Each function of a module (`fn(module, *arrays)`) is compiled by `compiled(fn)` as a function
of `(graphdef, state, *arrays)` with the graph definition static, so every handle of one
architecture (successive checkpoints, `api.Model`, the evaluators, the demo's report) shares one
compilation per input shape. `model_fns(graphdef)` binds them to one graph:

    fns = model_fns(graphdef)
    fns.image_features(state, pixels)        # {"image_tokens", "queries", "image_emb"}
    fns.report_tokens(special, decoding)(state, pixels, rng)

`generate_images` is the text-to-image path (frozen MedUnifier + prior), compiled once per
pair of graphs, decoding steps and input shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from medunifier_jax import compile_options

# -- pure functions of a MedUnifier module -----------------------------------------------------


def image_tokens(m, pixel_values):
  """(B, S, S, 3) normalised -> (B, 1 + N, Dv) ViT tokens after `ln_vision`."""
  return m.image_tokens(pixel_values)


def image_features(m, pixel_values) -> dict[str, jax.Array]:
  """(B, S, S, 3) -> `image_tokens` (B, 1 + N, Dv), `queries` (B, Q, H) query outputs,
  `image_emb` (B, Q, E) normalised projected queries."""
  tokens = m.image_tokens(pixel_values)
  queries = m.image_queries(tokens)
  return {"image_tokens": tokens, "queries": queries, "image_emb": m.image_embeddings(queries)}


def text_features(m, input_ids, attention_mask) -> dict[str, jax.Array]:
  """(B, T) ids and mask -> `text_hidden` (B, T, H) text-mode states ([CLS] first),
  `text_emb` (B, E) normalised projected [CLS] feature."""
  hidden = m.text_hidden(input_ids, attention_mask)
  return {"text_hidden": hidden, "text_emb": m.text_embeddings(hidden)}


def itm_logits(m, image_tokens, input_ids, attention_mask):
  """ViT tokens (B, 1 + N, Dv) and texts (B, T) -> (B, 2) matching logits, row-aligned."""
  return m.itm_logits(image_tokens, input_ids, attention_mask)


def itm_all_pairs(m, pixel_values, input_ids, attention_mask):
  """ITM logits (B, M, 2) of every image (B, S, S, 3) with every text (M, T). The ViT runs once
  per image; its tokens are repeated for the B x M pairs, scored as row-aligned pairs
  (image-major order)."""
  b, n_texts = pixel_values.shape[0], input_ids.shape[0]
  tokens = jnp.repeat(m.image_tokens(pixel_values), n_texts, axis=0)
  ids = jnp.tile(input_ids, (b, 1))
  mask = jnp.tile(attention_mask, (b, 1))
  return m.itm_logits(tokens, ids, mask).reshape(b, n_texts, 2)


def temperature(m):
  """The learned ITC temperature (clamped as in training)."""
  return m.temperature()


def _tig_pass(m, pixel_values, input_ids, attention_mask):
  tokens = m.image_tokens(pixel_values)
  queries = m.image_queries(tokens)
  text = m.text_hidden(input_ids, attention_mask)
  return m.vqvae(queries, tokens[:, 1:], text[:, 0], train=False), text


def reconstruct(m, pixel_values, input_ids, attention_mask) -> dict[str, jax.Array]:
  """The evaluation-mode TIG pass (running BatchNorm statistics): `recon` (B, S, S, 3) clipped
  to [0, 1], `codes_top` (B, g/2, g/2) and `codes_bottom` (B, g, g) int32 ((B, g, g, R) with R
  codes per bottom cell)."""
  out, _ = _tig_pass(m, pixel_values, input_ids, attention_mask)
  return {
    "recon": jnp.clip(out.recon, 0.0, 1.0),
    "codes_top": out.codes_top,
    "codes_bottom": out.codes_bottom,
  }


def codes_and_text(m, pixel_values, input_ids, attention_mask):
  """The same pass for the prior's code cache -> codes_top (B, g/2, g/2), codes_bottom (B, g, g)
  (or (B, g, g, R)), text states (B, T, H). The decoder's output is unused, so XLA drops it."""
  out, text = _tig_pass(m, pixel_values, input_ids, attention_mask)
  return out.codes_top, out.codes_bottom, text


def report_tokens(m, pixel_values, rng, *, special, decoding, cached: bool = True):
  """(B, S, S, 3) -> `generation.DecodeOutput` (ids (B, max_length), scores (B,)); `cached=False`
  recomputes the prefix at every step (the reference the cached decoder must equal)."""
  from medunifier_jax import generation

  fn = generation.generate_tokens if cached else generation.generate_tokens_uncached
  return fn(m, pixel_values, special, decoding, rng)


# -- compilation -------------------------------------------------------------------------------


@functools.cache
def compiled(fn: Callable, **static: Any) -> Callable:
  """`fn(module, *arrays, **static)` as a jitted `(graphdef, state, *arrays)`; the graph
  definition and `static` (hashable) are compile-time constants. Cached per `fn` and `static`:
  pass a module-level function (a new lambda per call would compile anew each time)."""

  def pure(graphdef, state, *arrays):
    return fn(nnx.merge(graphdef, state), *arrays, **static)

  return jax.jit(pure, static_argnums=0, compiler_options=compile_options.for_jit())


class ModelFns:
  """The compiled functions above, bound to one MedUnifier graph: each takes `(state, ...)`."""

  def __init__(self, graphdef: nnx.GraphDef):
    self.graphdef = graphdef
    bind = lambda fn: functools.partial(compiled(fn), graphdef)
    self.image_tokens = bind(image_tokens)
    self.image_features = bind(image_features)
    self.text_features = bind(text_features)
    self.itm_logits = bind(itm_logits)
    self.itm_all_pairs = bind(itm_all_pairs)
    self.temperature = bind(temperature)
    self.reconstruct = bind(reconstruct)
    self.codes_and_text = bind(codes_and_text)

  def report_tokens(self, special, decoding, cached: bool = True) -> Callable:
    """`(state, pixel_values, rng) -> DecodeOutput` for these decoding settings."""
    fn = compiled(report_tokens, special=special, decoding=decoding, cached=cached)
    return functools.partial(fn, self.graphdef)


@functools.cache
def model_fns(graphdef: nnx.GraphDef) -> ModelFns:
  """The `ModelFns` of `graphdef` (built once per graph definition)."""
  return ModelFns(graphdef)


# -- text to image -----------------------------------------------------------------------------


def _generate_images(
  mu_def,
  mu_state,
  prior_def,
  prior_state,
  input_ids,
  attention_mask,
  keys,
  settings,
  *,
  steps,
  guided,
  null_condition=False,
  candidates=1,
  pixel_stats=None,
):
  """Reports' tokens (B, T) -> images (B, S, S, 3) float32 in [0, 1], codes_top (B, g/2, g/2),
  codes_bottom (B, g, g) or (B, g, g, R) (`prior.sample.generate_fn`; `settings` a
  `SamplingSettings`; `candidates` > 1: the best of that many per row by the MedUnifier's ITM
  score, `pixel_stats` its image (mean, std)). Graph definitions are static: one compilation
  per architecture pair, steps, candidates and input shapes, shared by every checkpoint, seed,
  guidance weight and temperature."""
  from medunifier_jax.prior import sample

  mu, prior = nnx.merge(mu_def, mu_state), nnx.merge(prior_def, prior_state)
  return sample.generate_fn(
    mu,
    prior,
    input_ids,
    attention_mask,
    keys,
    settings,
    steps=steps,
    guided=guided,
    null_condition=null_condition,
    candidates=candidates,
    pixel_stats=pixel_stats,
  )


# Compiled with the project's options (`compile_options`): one compilation per graph pair,
# static settings and input shapes.
generate_images = compile_options.jit(
  _generate_images,
  static_argnums=(0, 2),
  static_argnames=("steps", "guided", "null_condition", "candidates"),
)
