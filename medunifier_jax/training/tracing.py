"""Tracing helpers.

`cheap_tracer_diagnostics` reaches into a private JAX class: no public switch turns the
diagnostic off, and without it tracing the paper configuration's train step takes about 50 s
instead of 15 s (`aot.lower_train_step`, 8 simulated devices; docs/PERFORMANCE.md). So that a
JAX upgrade that moves the class costs a warning and a failing test
(`tests/test_model_io.py`) rather than silent minutes, `is_active()` says whether the hook is
still there.
"""

import contextlib
import logging
from collections.abc import Iterator

_warned = False


def _tracer_class():
  try:
    from jax._src.interpreters import partial_eval
  except ImportError:
    return None
  tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
  return tracer if callable(getattr(tracer, "_origin_msg", None)) else None


def is_active() -> bool:
  """Whether this JAX still has the diagnostic that `cheap_tracer_diagnostics` blanks."""
  return _tracer_class() is not None


@contextlib.contextmanager
def cheap_tracer_diagnostics() -> Iterator[None]:
  """Skips JAX's "where did this tracer come from" text while a constructor is traced.

  Every `nnx.Rngs` draw updates a counter through `Variable.__setitem__`, which probes
  `value.sharding`; on a tracer that raises an AttributeError whose message JAX builds by
  walking the whole trace so far. Inside `nnx.eval_shape` of a large model this is quadratic
  (6.6 s instead of 0.6 s to trace the paper's 1.4B-parameter model, almost all of it composing
  messages nobody reads). The message is only diagnostic text, so it is blanked for the
  duration.
  """
  global _warned
  tracer = _tracer_class()
  if tracer is None:
    if not _warned:
      _warned = True
      logging.getLogger(__name__).warning(
        "this JAX version has no DynamicJaxprTracer._origin_msg: tracing large models will be "
        "slower (medunifier_jax.training.tracing)"
      )
    yield
    return
  original = tracer._origin_msg
  tracer._origin_msg = lambda self: ""
  try:
    yield
  finally:
    tracer._origin_msg = original
