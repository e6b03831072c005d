"""The project's XLA compiler options (`compile_options`)."""

import jax
import numpy as np
import pytest

from medunifier_jax import compile_options


def test_options_apply_on_the_cpu_and_a_callers_own_win():
  options = compile_options.for_jit()
  if jax.default_backend() != "cpu":
    assert options == {}
    return
  if not options:
    pytest.skip("this XLA does not accept the project's CPU options")
  assert options == compile_options.CPU
  mine = {"xla_backend_optimization_level": 0}
  assert compile_options.for_jit(mine) == {**compile_options.CPU, **mine}
  # A convolution compiled with them is XLA's own, not a library call, and computes the same.
  x = np.random.default_rng(0).normal(size=(2, 9, 9, 4)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  ours = jax.jit(conv, compiler_options=options).lower(x, w).compile()
  default = jax.jit(conv).lower(x, w).compile()
  assert "ynn_fusion" not in ours.as_text()
  np.testing.assert_allclose(ours(x, w), default(x, w), rtol=1e-5, atol=1e-5)


def test_jit_compiles_with_the_options_and_keeps_static_arguments():
  if not compile_options.for_jit():
    pytest.skip(f"no compiler options here ({jax.default_backend()}, or an XLA without them)")
  x = np.random.default_rng(0).normal(size=(2, 9, 9, 4)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32)

  def conv(x, w, *, padding):
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  ours = compile_options.jit(conv, static_argnames="padding")
  assert "ynn_fusion" not in ours.lower(x, w, padding="SAME").compile().as_text()
  default = jax.jit(conv, static_argnames="padding")
  for padding, size in (("SAME", 9), ("VALID", 7)):
    out = ours(x, w, padding=padding)
    assert out.shape == (2, size, size, 5)
    np.testing.assert_allclose(out, default(x, w, padding=padding), rtol=1e-5, atol=1e-5)
