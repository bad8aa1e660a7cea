"""The layers: Dense's gradients, rotary positions, cross-attention, clear errors (the attention
core and its masks: test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama

from internvl_jax.models import layers
from internvl_jax.models.attention import AttentionMask


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("features,axis,names", [
    (24, -1, ("embed", "mlp")), ((3, 8), -1, ("embed", "heads", "kv")),
    (24, (-2, -1), ("heads", "kv", "embed"))])
def test_dense_gradients_equal_the_plain_contraction(features, axis, names, dtype):
  """On the CPU the kernel gradient is a row-major GEMM of its own (`_matmul_plain_weight_grad`):
  the values of autodiff through the plain contraction, and no GEMM with a transposed operand."""
  dense = layers.dense(features, names, axis=axis, dtype=jnp.dtype(dtype))
  contracted = (2, 3) if isinstance(axis, tuple) else (3,)
  x = jnp.asarray(_normal(2, 5, 4, 6))
  params = dense.init(jax.random.key(0), x)["params"]

  def plain(params, x):
    y = jax.lax.dot_general(x.astype(dtype), params["kernel"].value.astype(dtype),
                            ((contracted, tuple(range(len(contracted)))), ((), ())))
    return jnp.sum(jnp.sin(y + params["bias"].value.astype(dtype)).astype(jnp.float32))

  ours = lambda params, x: jnp.sum(jnp.sin(dense.apply({"params": params}, x)).astype(jnp.float32))
  step = jax.jit(jax.grad(ours, argnums=(0, 1))).lower(params, x).compile()
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for got, want in zip(jax.tree.leaves(step(params, x)),
                       jax.tree.leaves(jax.grad(plain, argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tolerance, atol=tolerance)
  assert "lhs_contracting_dims={0}" not in step.as_text()


def test_rotary_embedding_matches_transformers():
  x, positions = _normal(2, 5, 3, 16), np.array([[0, 1, 2, 3, 4], [7, 8, 9, 30, 2047]])
  ours = layers.rotary_embedding(jnp.asarray(x), jnp.asarray(positions), 500.0)
  inv_freq = 1.0 / (500.0**(torch.arange(0, 16, 2, dtype=torch.float) / 16))
  angles = torch.from_numpy(positions).float()[..., None] * inv_freq
  cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
  theirs, _ = modeling_llama.apply_rotary_pos_emb(
      torch.from_numpy(x), torch.from_numpy(x), cos, sin, unsqueeze_dim=2)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_cross_attention_reads_other_widths_and_ignores_masked_keys():
  attention = layers.Attention(num_heads=4, head_dim=8, out_features=32, num_kv_heads=2)
  x, vision = _normal(2, 3, 32), _normal(2, 6, 48, seed=1)
  params = attention.init(jax.random.key(0), x, vision)
  assert params["params"]["k_proj"]["kernel"].value.shape == (48, 2, 8)
  visible = AttentionMask(np.ones((2, 3), np.int32), np.array([[1, 1, 1, 1, 0, 0]] * 2, np.int32))
  out = attention.apply(params, x, vision, mask=visible)
  changed = vision.copy()
  changed[:, 4:] += 10.0
  assert out.shape == (2, 3, 32)
  np.testing.assert_allclose(attention.apply(params, x, changed, mask=visible), out, atol=1e-6)
  assert not np.allclose(attention.apply(params, x, changed), out, atol=1e-3)


def test_attention_misuse_gives_clear_errors():
  rotary = layers.Attention(num_heads=2, head_dim=4, out_features=8, rope_base=10000.0)
  x = _normal(1, 3, 8)
  with pytest.raises(ValueError, match="needs the token positions"):
    rotary.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="Cross-attention takes no rotary embeddings"):
    rotary.init(jax.random.key(0), x, x)
