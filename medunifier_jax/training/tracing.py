"""Tracing helpers."""

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def cheap_tracer_diagnostics() -> Iterator[None]:
  """Skips JAX's "where did this tracer come from" text while a constructor is traced.

  Every `nnx.Rngs` draw updates a counter through `Variable.__setitem__`, which probes
  `value.sharding`; on a tracer that raises an AttributeError whose message JAX builds by
  walking the whole trace so far. Inside `nnx.eval_shape` of a large model this is quadratic
  (minutes for the paper's 1.4B-parameter model, almost all of it composing messages nobody
  reads). The message is only diagnostic text, so it is blanked for the duration.
  """
  from jax._src.interpreters import partial_eval

  tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
  original = getattr(tracer, "_origin_msg", None)
  if original is None:
    yield
    return
  tracer._origin_msg = lambda self: ""
  try:
    yield
  finally:
    tracer._origin_msg = original
