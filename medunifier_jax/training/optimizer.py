"""AdamW with warm-up + cosine decay, clipping, selective weight decay, per-submodule learning-rate
multipliers, and the trainable filter.

Weight decay applies to the weight matrices and convolution kernels of linear maps only. It is
not applied to
  * parameters with fewer than two dimensions: biases, LayerNorm/BatchNorm scales, the
    temperature (decaying a norm scale or the temperature changes the function, not its
    complexity);
  * embedding tables and learned vectors (word/position embeddings, the class token, the
    learned queries, VQ codebooks): decay pulls rows that are rarely used (rare tokens, idle
    codes) towards zero between their updates, which is a bias rather than a regulariser.
"""

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from medunifier_jax.training import tree_paths

# Path components (regular expressions, full match) that mark embedding-like parameters.
NO_DECAY_NAMES = (
  r".*embedding.*",
  r".*embeddings.*",
  r"pos(ition)?_embed.*",
  r"cls_token",
  r"query_tokens",
  r"codebook.*",
  r"embed",
  r"temp",
)


def trainable_filter(model_config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """The parameters that receive gradients: all `nnx.Param`s, minus the ViT when it is frozen
  (`model.vit.frozen`) and minus every submodule named in `model.frozen_paths` (e.g. the frozen
  text encoder of the image prior, configs/prior.py).

  A frozen ViT is the path component `vit` only, its blocks and embeddings: the LayerNorm after
  it is the sibling `ln_vision` and stays trainable, as in BLIP-2 (the paper's code freezes
  `visual_encoder` and trains `ln_vision`)."""
  frozen = [str(p) for p in model_config.get("frozen_paths", None) or ()]
  vit = model_config.get("vit", None)
  if vit is not None and vit.frozen:
    frozen.insert(0, "vit")
  if not frozen:
    return nnx.Param
  return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(p)) for p in frozen))


def decay_mask(params: nnx.State, no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> nnx.State:
  """A tree of bools like `params`: True where weight decay applies (see module docstring)."""
  patterns = [re.compile(p) for p in no_decay_names]

  def decays(path, x) -> bool:
    if jnp.ndim(x) < 2:
      return False
    return not any(p.fullmatch(n) for p in patterns for n in tree_paths.path_names(path))

  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to `end_learning_rate`."""
  warmup = int(config.warmup_steps)
  decay_steps = max(int(config.num_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(config.learning_rate),
    warmup_steps=warmup,
    decay_steps=decay_steps,
    end_value=float(config.end_learning_rate),
  )


def under_module(name: str):
  """A mask function: True for the parameters with `name` as a component of their path; a name
  no parameter has is an error (a misspelt multiplier would otherwise change nothing)."""

  def mask(params: nnx.State) -> nnx.State:
    marks = lambda path, _: name in tree_paths.path_names(path)
    out = jax.tree_util.tree_map_with_path(marks, params)
    if not any(jax.tree_util.tree_leaves(out)):
      raise ValueError(
        f"lr_multipliers names {name!r}, which is no submodule of the trained parameters"
      )
    return out

  return mask


def make_tx(
  config: ml_collections.ConfigDict, multipliers: bool = True
) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (paper values: betas 0.9/0.95, weight decay 0.05), then
  `config.lr_multipliers` ({submodule name: factor}): scaling AdamW's update of a submodule's
  parameters by a factor is training them at that multiple of the learning rate (weight decay
  included, as AdamW scales it by the learning rate too). `multipliers=False` leaves them out,
  for models that are not the one the configuration describes (e.g. `supervised.py`'s ViT)."""
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  parts.append(
    optax.adamw(
      learning_rate_schedule(config),
      b1=float(config.adam_b1),
      b2=float(config.adam_b2),
      weight_decay=float(config.weight_decay),
      mask=decay_mask,
    )
  )
  multiplied = (config.get("lr_multipliers", None) or {}) if multipliers else {}
  for name, factor in multiplied.items():
    if float(factor) != 1.0:  # 1: no transform, so the optimizer state keeps its structure
      parts.append(optax.masked(optax.scale(float(factor)), under_module(str(name))))
  return optax.chain(*parts)


def make_optimizer(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Optimizer:
  """`nnx.Optimizer` over the trainable filter: frozen parameters get no optimizer state."""
  return nnx.Optimizer(model, make_tx(config), wrt=trainable_filter(config.model))
