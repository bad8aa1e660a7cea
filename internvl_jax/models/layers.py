"""Building blocks shared by every model: norms, attention, MLP, stochastic depth, remat.

Modules name the logical axes of their params and activations; `sharding.py` maps those names to
mesh axes. Params are float32; matmuls run in the module's `dtype`.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# BEiT-style init (the paper's stage-1 recipe): truncated normal with std 0.02, zero biases.
default_kernel_init = nn.initializers.truncated_normal(0.02)

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing but the block inputs
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch_saveable": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def logical_param(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Names the logical axes of an activation (a no-op outside a mesh with logical rules)."""
  return nn.with_logical_constraint(x, names)


def remat(module_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """Wraps a block class in rematerialization with a named policy ("none" leaves it as is)."""
  if policy == "none":
    return module_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; known: {['none', *REMAT_POLICIES]}.")
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=False)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, cast back, then scaled (the reference's order of operations)."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical_param(nn.initializers.ones, ("norm",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


def make_norm(norm_type: str, eps: float, dtype, name: str) -> nn.Module:
  if norm_type == "rms_norm":
    return RMSNorm(eps=eps, dtype=dtype, name=name)
  if norm_type == "layer_norm":
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, name=name,
        scale_init=logical_param(nn.initializers.ones, ("norm",)),
        bias_init=logical_param(nn.initializers.zeros, ("norm",)))
  raise ValueError(f"Unknown norm_type {norm_type!r}.")


def dense(features, names, *, axis=-1, use_bias=True, dtype=jnp.float32, name=None):
  """DenseGeneral whose kernel and bias carry logical axis names (kernel names: inputs then outputs)."""
  features_tuple = features if isinstance(features, tuple) else (features,)
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, name=name,
      kernel_init=logical_param(default_kernel_init, names),
      bias_init=logical_param(nn.initializers.zeros, names[-len(features_tuple):]))


def dot_product_attention(q, k, v, mask=None):
  """Softmax attention over (batch, length, heads, head_dim) inputs; softmax in float32.

  `mask` is boolean, broadcastable to (batch, heads, q_length, kv_length); True means visible.
  """
  scale = q.shape[-1]**-0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and optional full-width QK-norm.

  The fused kernel has shape (embed, 3, heads, head_dim): the output layout of the reference's
  `qkv` Linear, so conversion is a reshape. QK-norm normalizes q and k over all heads jointly
  (the whole embed width) before they are split into heads, as InternViT-6B does.
  """

  num_heads: int
  head_dim: int
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    qkv = dense((3, self.num_heads, self.head_dim), ("embed", None, "heads", "head_dim"),
                use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      full_width = (batch, length, self.num_heads * self.head_dim)
      q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q.reshape(full_width)).reshape(q.shape)
      k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k.reshape(full_width)).reshape(k.shape)
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    out = dot_product_attention(q, k, v, mask)
    return dense(width, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=self.dtype,
                 name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = constrain(nn.gelu(h, approximate=False), ("act_batch", "act_len", "act_mlp"))
    return dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample with probability `rate`."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))
