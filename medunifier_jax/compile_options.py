"""XLA options the project compiles its functions with, by backend.

On the CPU, XLA hands single dots, every convolution and reductions to its YNN library by
default (jaxlib 0.10: `xla_cpu_experimental_ynn_fusion_type` defaults to individual dots,
individual convolutions and reductions). For the project's convolutions XLA's own convolution is
faster (2 cores, docs/PERFORMANCE.md, "XLA's convolution library on the CPU"): the FID
Inception's forward takes half the time (3.45 -> 1.70 s for 25 images of 48 px) and the demo's
four-objective step, whose VQ-VAE is convolutions, a tenth less (new/old 0.90, the median of 8
pairs in one process). `CPU` is the default list without convolutions. Results move by float
rounding only (another summation order): Inception features by at most 6e-6.

`for_jit()` gives the options for `jax.jit(..., compiler_options=...)`: `CPU` on the CPU where
this XLA accepts them (probed once per process by compiling a 2 x 2 product), none on other
backends or on an XLA that has dropped the option. `jit(fn, ...)` is `jax.jit` with them, for
module-level functions: the options are settled at the first call, not at import, so that
importing a module starts no backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

CPU = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"  # the default but convolutions
  )
}


@functools.cache
def _accepted(backend: str) -> tuple[tuple[str, Any], ...]:
  if backend != "cpu":
    return ()
  options = tuple(CPU.items())
  probe = jax.jit(lambda x: x @ x, compiler_options=dict(options))
  try:
    probe.lower(np.ones((2, 2), np.float32)).compile()
  except jax.errors.JaxRuntimeError:  # an XLA without the option: compile as it would by default
    return ()
  return options


def for_jit(extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The project's options for the default backend, updated with `extra` (a caller's own)."""
  return {**dict(_accepted(jax.default_backend())), **(extra or {})}


def jit(fn: Callable, **jit_kwargs: Any) -> Callable:
  """`jax.jit(fn, compiler_options=for_jit(), **jit_kwargs)`, built at the first call.

  One compiled function per set of options (the default backend's, looked up at each call);
  `jit_kwargs` are `jax.jit`'s (`static_argnums`, `static_argnames`, ...). `.lower(...)` lowers
  it ahead of time, as `jax.jit`'s does.
  """

  @functools.cache
  def jitted(options: tuple[tuple[str, Any], ...]) -> Callable:
    return jax.jit(fn, compiler_options=dict(options), **jit_kwargs)

  def current() -> Callable:
    return jitted(tuple(for_jit().items()))

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return current()(*args, **kwargs)

  call.lower = lambda *args, **kwargs: current().lower(*args, **kwargs)
  return call
