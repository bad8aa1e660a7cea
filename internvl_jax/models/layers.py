"""Building blocks shared by every model: norms, attention, RoPE, MLPs, stochastic depth.

Modules name the logical axes of their params and activations; `sharding.py` maps those names to
mesh axes. Params are float32; matmuls run in the module's `dtype`. Projections and attention tag
their outputs with `checkpoint_name`, for the remat policies of `remat.py` (its docstring lists
the names).

Attention is one core, `attention.attention` (masks, grouped-query heads, the kernel the config
picks), with two projection variants around it: `SelfAttention` (InternViT's fused qkv and
QK-norm) and `Attention` (separate q/k/v/o projections: LLaMA's causal attention with RoPE and a
KV cache, and cross-attention whose keys and values come from another sequence).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from internvl_jax.config import AttentionConfig, RopeScaling
from internvl_jax.models import attention

# BEiT-style init (the paper's stage-1 recipe): truncated normal with std 0.02, zero biases.
default_kernel_init = nn.initializers.truncated_normal(0.02)


def logical_param(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Names the logical axes of an activation (a no-op outside a mesh with logical rules)."""
  return nn.with_logical_constraint(x, names)


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


@jax.custom_vjp
def _matmul_plain_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel for a 2-D kernel, whose kernel gradient is a plain row-major GEMM.

  Autodiff writes the kernel gradient as one GEMM contracting the leading (token) axis of both x
  and the output gradient, which XLA:CPU runs far below its plain rate (BENCHMARKS.md).
  Transposing x into a buffer of its own first (the barrier keeps XLA from folding the
  transpose back into the dot) costs one copy of x and makes it a plain GEMM.
  """
  return jnp.matmul(x, kernel)


def _matmul_forward(x, kernel):
  return jnp.matmul(x, kernel), (x, kernel)


def _matmul_backward(residuals, grad):
  x, kernel = residuals
  grad_x = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
  rows = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
  grad_kernel = jnp.matmul(rows, grad.reshape(-1, grad.shape[-1]))
  return grad_x, grad_kernel


_matmul_plain_weight_grad.defvjp(_matmul_forward, _matmul_backward)


class Dense(nn.Module):
  """nn.DenseGeneral, but the kernel is created in its full (inputs..., outputs...) shape.

  DenseGeneral creates its kernel flat and reshapes it; under a mesh with logical rules flax then
  applies the multi-axis names to the flat array and fails (google/flax#3676). Same params and
  init values as DenseGeneral.
  """

  features: tuple[int, ...]
  axis: tuple[int, ...]
  names: tuple[str | None, ...]  # inputs then outputs
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    kernel = self.param("kernel", logical_param(default_kernel_init, self.names),
                        in_shape + self.features)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    outer = x.shape[:x.ndim - len(axis)]
    if axis == tuple(range(len(outer), x.ndim)):
      # One 2-D matmul of row-major flattened views (bitcasts; a sharded heads axis stays the
      # major part of its merged axis): with several contracted or output axes, XLA:CPU
      # transposes the kernel and its gradient at every step instead.
      matmul = (_matmul_plain_weight_grad if attention.target_platform() == "cpu"
                else jnp.matmul)
      y = matmul(x.reshape(outer + (-1,)), kernel.reshape(math.prod(in_shape), -1))
      y = y.reshape(outer + self.features)
    else:
      y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical_param(nn.initializers.zeros, self.names[len(axis):]),
                        self.features)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Embed):
  """nn.Embed whose lookup reads the table with its width whole (its vocabulary still split).

  FSDP splits the table's width; a lookup from such rows gives width-split activations, which
  XLA can turn into the batch-split ones the layers take only by replicating them. Gathering the
  width first is what FSDP does for every kernel. Same params and values as nn.Embed.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    table = constrain(self.embedding, ("vocab", None))
    return jnp.take(table, inputs, axis=0).astype(self.dtype)


def dense(features, names, *, axis=-1, use_bias=True, dtype=jnp.float32, name=None) -> Dense:
  """A Dense layer whose kernel and bias carry logical axis names (kernel names: inputs then outputs)."""
  features = features if isinstance(features, tuple) else (features,)
  axis = axis if isinstance(axis, tuple) else (axis,)
  return Dense(features, axis, tuple(names), use_bias, dtype, name=name)


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None,
                     length: jax.Array | None = None) -> tuple[jax.Array, float]:
  """(head_dim / 2,) inverse frequencies and the factor on cos and sin.

  `length` (a traced int) is the sequence length that dynamic and LongRoPE scaling key on (see
  `RopeScaling.length`); linear scaling divides the positions instead (`rotary_embedding`). Every
  operation is float32, as in the references.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  if scaling is None or scaling.kind == "linear":
    return 1.0 / base**exponents, 1.0
  if length is None:
    raise ValueError(f"{scaling.kind} RoPE scaling needs the sequence length.")
  original, factor = scaling.original_max_positions, scaling.factor
  if scaling.kind == "dynamic":
    # max(): below the original length the formula gives the base unchanged, as both references.
    length = jnp.maximum(length, original).astype(jnp.float32)
    base = base * (factor * length / original - (factor - 1))**(head_dim / (head_dim - 2))
    return 1.0 / base**exponents, 1.0
  divisors = jnp.where(length > original, jnp.asarray(scaling.long_factor, jnp.float32),
                       jnp.asarray(scaling.short_factor, jnp.float32))
  scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
  return 1.0 / (divisors * base**exponents), scale


def rope_length(scaling: RopeScaling | None, positions: jax.Array, num_keys) -> jax.Array | None:
  """The sequence length `scaling` keys on: the batch's largest position plus one, or the number
  of keys (cache slots included); None when the scaling needs none."""
  if scaling is None or scaling.kind == "linear":
    return None
  return jnp.asarray(num_keys) if scaling.length == "keys" else jnp.max(positions) + 1


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float,
                     scaling: RopeScaling | None = None, length: jax.Array | None = None) -> jax.Array:
  """Rotates (batch, length, heads, head_dim) by (batch, length) positions, in float32.

  transformers' "rotate half" convention: dimension i < head_dim / 2 pairs with i + head_dim / 2
  and turns by the angle position * base**(-2i / head_dim), as changed by `scaling`
  (`rope_frequencies`).
  """
  inv_freq, scale = rope_frequencies(x.shape[-1], base, scaling, length)
  positions = positions.astype(jnp.float32)
  if scaling is not None and scaling.kind == "linear":
    positions = positions / scaling.factor  # InternLM2's order: t / factor, then times inv_freq
  angles = positions[:, :, None, None] * inv_freq
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and optional full-width QK-norm.

  The fused kernel has shape (embed, 3, heads, head_dim): the output layout of the reference's
  `qkv` Linear, so conversion is a reshape. QK-norm normalizes q and k over all heads jointly
  (the whole embed width) before they are split into heads, as InternViT-6B does. Its heads are
  InternViT's ("vit_heads"), which shard unlike the LLMs' (`sharding.RULES`).
  """

  num_heads: int
  head_dim: int
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  attention_config: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, x: jax.Array, mask: attention.Masks | None = None) -> jax.Array:
    batch, length, width = x.shape
    qkv = dense((3, self.num_heads, self.head_dim), ("embed", None, "vit_heads", "head_dim"),
                use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    q, k, v = (checkpoint_name(qkv[:, :, i], name)
               for i, name in enumerate(("query_proj", "key_proj", "value_proj")))
    if self.qk_norm:
      full_width = (batch, length, self.num_heads * self.head_dim)
      q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q.reshape(full_width)).reshape(q.shape)
      k = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(k.reshape(full_width)).reshape(k.shape)
    q = constrain(q, ("activation_batch", "activation_length", "activation_vit_heads", None))
    out = checkpoint_name(attention.attention(q, k, v, mask, self.attention_config,
                                              head_names=("activation_vit_heads",) * 2),
                          "attention_out")
    out = dense(width, ("vit_heads", "head_dim", "embed"), axis=(-2, -1), dtype=self.dtype,
                name="proj")(out)
    return checkpoint_name(out, "out_proj")


class Attention(nn.Module):
  """Attention with separate q/k/v/o projections around `attention.attention`.

  Self-attention (`kv_inputs` None) or cross-attention (keys and values from `kv_inputs`, of any
  width), multi-head or grouped-query (`num_kv_heads` < `num_heads`), with rotary positions when
  `rope_base` is set (and `rope_scaling`, see `RopeScaling`). `query`, `keys_values` and `attend`
  are exposed so that a caller can keep a KV cache, or compute cross-attention keys and values once
  and reuse them; with dynamic or LongRoPE scaling that caller passes the `rope_length` of the
  whole sequence (`rope_length`), which the new tokens alone do not tell.
  """

  num_heads: int
  head_dim: int
  out_features: int
  num_kv_heads: int | None = None  # None: as many as query heads
  use_bias: bool = False
  out_bias: bool | None = None  # None: as use_bias (Qwen2 has q/k/v biases but none on o)
  rope_base: float | None = None
  rope_scaling: RopeScaling | None = None
  dtype: jnp.dtype = jnp.float32
  attention_config: AttentionConfig = AttentionConfig()

  def setup(self):
    kv_heads = self.num_kv_heads or self.num_heads
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    proj = functools.partial(dense, use_bias=self.use_bias, dtype=self.dtype)
    self.q_proj = proj((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"))
    self.k_proj = proj((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"))
    self.o_proj = proj(self.out_features, ("heads", "head_dim", "embed"), axis=(-2, -1),
                       use_bias=out_bias)

  def _rotate(self, x, positions, rope_length):
    if self.rope_base is None:
      return x
    if positions is None:
      raise ValueError("Attention with rotary embeddings needs the token positions.")
    return rotary_embedding(x, positions, self.rope_base, self.rope_scaling, rope_length)

  def query(self, x: jax.Array, positions: jax.Array | None = None,
            rope_length: jax.Array | None = None) -> jax.Array:
    q = self._rotate(checkpoint_name(self.q_proj(x), "query_proj"), positions, rope_length)
    return constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

  def keys_values(self, x: jax.Array, positions: jax.Array | None = None,
                  rope_length: jax.Array | None = None):
    names = ("activation_batch", "activation_length", "activation_kv_heads", None)
    k = self._rotate(checkpoint_name(self.k_proj(x), "key_proj"), positions, rope_length)
    return constrain(k, names), constrain(checkpoint_name(self.v_proj(x), "value_proj"), names)

  def attend(self, q, k, v, mask: attention.Masks | None = None) -> jax.Array:
    out = checkpoint_name(attention.attention(q, k, v, mask, self.attention_config),
                          "attention_out")
    return checkpoint_name(self.o_proj(out), "out_proj")

  def __call__(self, x: jax.Array, kv_inputs: jax.Array | None = None, *, mask=None,
               positions: jax.Array | None = None) -> jax.Array:
    if kv_inputs is not None and self.rope_base is not None:
      raise ValueError("Cross-attention takes no rotary embeddings: queries and keys have no "
                       "common positions.")
    length = None if positions is None else rope_length(self.rope_scaling, positions, x.shape[1])
    k, v = self.keys_values(x if kv_inputs is None else kv_inputs, positions, length)
    return self.attend(self.query(x, positions, length), k, v, mask)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = checkpoint_name(dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x),
                        "mlp_in")
    h = constrain(nn.gelu(h, approximate=False),
                  ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h),
                           "mlp_out")


class GatedMlp(nn.Module):
  """LLaMA's SwiGLU MLP: down(silu(gate(x)) * up(x)), without biases."""

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    proj = functools.partial(dense, use_bias=False, dtype=self.dtype)
    gate = checkpoint_name(proj(self.hidden_dim, ("embed", "mlp"), name="gate_proj")(x), "mlp_in")
    up = checkpoint_name(proj(self.hidden_dim, ("embed", "mlp"), name="up_proj")(x), "mlp_in")
    h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(proj(width, ("mlp", "embed"), name="down_proj")(h), "mlp_out")


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample with probability `rate`."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))
