"""tools/benchmark_profile.py puts each instruction of compiled HLO in a time category."""

import jax
import jax.numpy as jnp

import scripts

benchmark_profile = scripts.load("tools/benchmark_profile.py")


def test_instructions_are_categorized_by_what_they_compute_and_loops_are_left_out():
  def f(x, w):
    x = jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), x)
    return jnp.sum(x, axis=0), x.T

  x = jnp.ones((8, 16))
  compiled = jax.jit(f).lower(x, jnp.ones((16, 16))).compile()
  categories = benchmark_profile.op_categories(compiled.as_text())
  assert {"matmul", "reduction"} <= set(categories.values())
  assert not any(name.startswith("while") for name in categories)
