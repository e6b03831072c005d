"""A MedUnifier with random weights for evaluator tests, drawn without compiling an
initialiser."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medunifier_jax.models.medunifier import MedUnifier


def random_model(model_cfg, seed: int = 0):
  """(graphdef, state) of a MedUnifier with NumPy-drawn weights put into the abstract state:
  scale 1/sqrt(fan-in), unit norms and variances, zero biases and means."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MedUnifier(model_cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    if name in ("scale", "var"):
      value = np.ones(x.shape)
    elif name in ("bias", "mean", "q_bias", "v_bias"):
      value = np.zeros(x.shape)
    elif name == "temp":
      value = np.full(x.shape, model_cfg.temperature_init)
    else:
      fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 2500
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), x.shape)
    return jnp.asarray(value, x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, state)
