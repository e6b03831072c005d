"""A stack of transformer layers run as one `lax.scan` over their weights, stacked at call time.

XLA compiles a Python loop over L layers as L copies of the layer (forward and backward), so a
deep model's compile grows with its depth: the paper's 39 ViT blocks and 12 Q-Former layers, each
pass of the Q-Former (image, text, matching, generation) once more. Scanning compiles the layer
once. The weights stay stored per layer (`nnx.List`, the names the weight importers and the
checkpoints use); `scan_layers` stacks them along a new leading axis inside the traced function
(a copy of the weights per call, which FSDP shards like the weights themselves), and the
gradient flows back through the stacking to each layer's own parameters.

Layers that alternate in structure (the Q-Former's cross-attention every `cross_attention_freq`
layers) are scanned in groups of `period` consecutive layers; layer i and layer i + period must
have the same structure.

Randomness: unrolled, every layer draws dropout keys from the caller's `rngs` in turn. Scanned,
one key is drawn from `rngs.dropout` and split into one key per group, from which the group's
layers draw (another stream than the unrolled one's: statistically the same).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from medunifier_jax.models.layers import split_examples

# fn(layer, carry, per_layer_input, rngs) -> (carry, per_layer_output)
LayerFn = Callable[[nnx.Module, Any, Any, nnx.Rngs | None], tuple[Any, Any]]


def _stack(*leaves: jax.Array) -> jax.Array:
  return jnp.stack(leaves)


def scan_layers(
  modules: Sequence[nnx.Module],
  fn: LayerFn,
  carry: Any,
  per_layer: Sequence[Any] | None = None,
  *,
  rngs: nnx.Rngs | None = None,
  period: int = 1,
  remat: bool = False,
) -> tuple[Any, list[Any]]:
  """Runs `fn` over the L layers in order under one `lax.scan`.

  Args:
    modules: the L layers; L must be a multiple of `period`.
    fn: one layer's step, `fn(layer, carry, x_i, rngs) -> (carry, y_i)`; carry keeps its shapes.
    carry: the running value (a pytree of arrays, e.g. the hidden states (B, T, H)).
    per_layer: None, or L pytrees x_i of arrays (e.g. each layer's cached keys/values); entries
      i and i + period must have the same structure (None where a layer has none).
    rngs: dropout randomness (its `dropout` stream), or None (deterministic).
    period: the number of consecutive layers scanned as one step.
    remat: rematerialise each step in the backward pass (`jax.checkpoint`).
  Returns:
    The final carry and the L outputs y_i in layer order.
  """
  n = len(modules)
  if n == 0 or n % period:
    raise ValueError(f"cannot scan {n} layers in groups of {period}; unroll them instead")
  groups = n // period
  splits = [nnx.split(m) for m in modules]
  graphdefs = [gd for gd, _ in splits[:period]]
  for i, (gd, _) in enumerate(splits):
    if gd != graphdefs[i % period]:
      raise ValueError(
        f"layer {i} differs in structure from layer {i % period}; only layers with the same "
        f"structure every {period} can be scanned (set scan_layers=False)"
      )
  weights = [
    jax.tree.map(_stack, *[splits[g * period + k][1] for g in range(groups)]) for k in range(period)
  ]
  inputs = (
    None
    if per_layer is None
    else [
      jax.tree.map(_stack, *[per_layer[g * period + k] for g in range(groups)])
      for k in range(period)
    ]
  )
  keys = None if rngs is None else jax.random.split(rngs.dropout(), groups)
  like = jax.tree.leaves(carry)[0]

  def step(carry, xs):
    group_weights, group_inputs, key = xs
    # Inside the loop XLA's sharding propagation may leave the examples unsplit (the whole
    # global batch on every device); the constraint keeps each device on its share.
    carry, group_inputs = split_examples((carry, group_inputs), like)
    step_rngs = None if key is None else nnx.Rngs(dropout=key)
    outputs = []
    for k in range(period):
      layer = nnx.merge(graphdefs[k], group_weights[k])
      x_k = None if group_inputs is None else group_inputs[k]
      carry, y = fn(layer, carry, x_k, step_rngs)
      outputs.append(y)
    return split_examples(carry, like), outputs

  if remat:
    step = jax.checkpoint(step)
  carry, ys = jax.lax.scan(step, carry, (weights, inputs, keys))
  out = [jax.tree.map(lambda a, g=g: a[g], ys[k]) for g in range(groups) for k in range(period)]
  return carry, out
