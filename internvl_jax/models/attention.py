"""The one attention of every model, with its mask described rather than materialized.

`attention(q, k, v, mask, config)` takes (batch, length, heads, head_dim) inputs, keys and values
with as many heads as the queries or fewer (grouped-query: query head h uses key/value head
h // (q_heads // kv_heads), transformers' `repeat_kv` grouping), and an `AttentionMask`: a causal
flag and a bidirectional prefix (static), and per-token segment ids (arrays). Each
implementation turns that description into what its kernel takes: XLA a boolean mask, cuDNN
`is_causal` and a mask, splash its static mask classes and segment ids. Models build the
description, so no (queries, keys) array exists unless the implementation needs one.
"""

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from internvl_jax.config import AttentionConfig


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees.

  Query i sits at key slot `query_start` + i. Structurally it sees every key (`causal` False),
  or the keys at or before its slot and the first `prefix` keys (`causal` True: a decoder, or
  QLLaMA's queries ahead of causal text). With segment ids, a real query (id > 0) sees only the
  real keys of its own segment; ids are 0 for padding. What a padding query sees differs between
  implementations (XLA: every real key the structure allows, as transformers' mask; the kernels:
  padding keys), so callers use only the real queries' outputs.
  """

  q_segments: jax.Array | None = None  # (batch, q_length) int32
  kv_segments: jax.Array | None = None  # (batch, kv_length) int32
  # () int32 when queries are appended to a KV cache (decoding); None: queries start at slot 0.
  query_start: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  prefix: int = flax.struct.field(pytree_node=False, default=0)

  def __post_init__(self):
    if (self.q_segments is None) != (self.kv_segments is None):
      raise ValueError("AttentionMask takes segment ids for both queries and keys, or neither.")
    if self.prefix and not self.causal:
      raise ValueError("AttentionMask: a bidirectional prefix only means something when causal.")


# A mask, or one mask per equal chunk of the batch (QLLaMA runs its stage-2 modes in one pass).
Masks = AttentionMask | tuple[AttentionMask, ...]


def dense_mask(mask: Masks, q_length: int, kv_length: int) -> jax.Array:
  """The (batch or 1, 1, q_length, kv_length) boolean visibility `mask` describes."""
  if isinstance(mask, tuple):
    return jnp.concatenate([dense_mask(m, q_length, kv_length) for m in mask], axis=0)
  start = 0 if mask.query_start is None else mask.query_start
  query_slots, key_slots = start + jnp.arange(q_length), jnp.arange(kv_length)
  visible = jnp.ones((q_length, kv_length), bool)
  if mask.causal:
    visible = (key_slots[None, :] <= query_slots[:, None]) | (key_slots[None, :] < mask.prefix)
  visible = visible[None, None]
  if mask.q_segments is not None:
    queries, keys = mask.q_segments[:, :, None], mask.kv_segments[:, None, :]
    visible = visible & (((queries == keys) | (queries == 0)) & (keys > 0))[:, None]
  return visible


def attention(q, k, v, mask: Masks | None, config: AttentionConfig,
              head_names: tuple[str, str] = ("activation_heads", "activation_kv_heads"),
              ) -> jax.Array:
  """Softmax attention, softmax in float32, by the implementation `config` names; see the module
  docstring. `mask` None: every query sees every key. `head_names` are the logical axes of the
  query and key/value heads, which a kernel in `shard_map` is split over."""
  batch, _, heads, head_dim = q.shape
  if heads % k.shape[2]:
    raise ValueError(f"{heads} query heads cannot be grouped over {k.shape[2]} key/value heads.")
  mask = AttentionMask() if mask is None else mask
  masks = mask if isinstance(mask, tuple) else (mask,)
  if batch % len(masks):
    raise ValueError(f"a batch of {batch} rows does not split into {len(masks)} mask chunks.")
  implementation = resolve_implementation(config, q.dtype, head_dim)
  # Decoding with a KV cache stays on XLA: its queries start at a traced cache slot, which neither
  # kernel's static causal mask can take.
  if implementation == "xla" or any(m.query_start is not None for m in masks):
    return xla_attention(q, k, v, mask)
  kernel = (cudnn_attention if implementation == "cudnn" else
            functools.partial(splash_attention, config=config,
                              interpret=target_platform() != "tpu", head_names=head_names))
  return per_chunk(kernel, q, k, v, mask)


def per_chunk(kernel, q, k, v, mask: Masks) -> jax.Array:
  """`kernel(q, k, v, mask)` for one mask; for a tuple, on each batch chunk, concatenated."""
  if not isinstance(mask, tuple):
    return kernel(q, k, v, mask)
  chunks = zip(*(jnp.split(x, len(mask)) for x in (q, k, v)))
  return jnp.concatenate([kernel(*qkv, m) for qkv, m in zip(chunks, mask)], axis=0)


def target_platform() -> str:
  """The platform being compiled for: the mesh's under `jax.set_mesh` (which may be a TPU
  topology compiled ahead of time on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve_implementation(config: AttentionConfig, dtype, head_dim: int) -> str:
  if config.implementation != "auto":
    return config.implementation
  platform = target_platform()
  if platform == "tpu":
    return "splash"
  # cuDNN's flash attention takes half-precision inputs and head dims up to 128 in multiples of 8.
  if (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim <= 128 and head_dim % 8 == 0):
    return "cudnn"
  return "xla"


def xla_attention(q, k, v, mask: Masks) -> jax.Array:
  """The reference: float32 logits and softmax under the dense mask. The query-head groups are a
  reshape of q, so keys and values are never copied."""
  batch, q_length, heads, head_dim = q.shape
  kv_length, kv_heads = k.shape[1], k.shape[2]
  q = q.reshape(batch, q_length, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
  logits = logits.reshape(batch, heads, q_length, kv_length)
  logits = jnp.where(dense_mask(mask, q_length, kv_length), logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_length, kv_length)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", weights, v)
  return out.reshape(batch, q_length, heads, head_dim)


def cudnn_attention(q, k, v, mask: AttentionMask, implementation: str = "cudnn") -> jax.Array:
  """cuDNN flash attention through `jax.nn.dot_product_attention` (`implementation` "xla" runs
  the same arguments through JAX's own path, which is how CPU tests check them).

  A plain causal mask is `is_causal`, which lets cuDNN skip the blocks above the diagonal. The
  public API takes no segment ids, and padding may sit on either side, so segments (and a causal
  prefix) go in as a (batch, 1, queries, keys) boolean mask, which cuDNN applies as a bias.
  Padding queries see the padding keys, so that no row is empty.
  """
  q_length, kv_length = q.shape[1], k.shape[1]
  is_causal = mask.causal and not mask.prefix
  dense = None
  if mask.prefix:
    dense = dense_mask(AttentionMask(causal=True, prefix=mask.prefix), q_length, kv_length)
  if mask.q_segments is not None:
    same = mask.q_segments[:, None, :, None] == mask.kv_segments[:, None, None, :]
    dense = same if dense is None else dense & same
  return jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=is_causal,
                                      implementation=implementation)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_attention(q, k, v, mask: AttentionMask, config: AttentionConfig, interpret: bool,
                     head_names: tuple[str, str] = ("activation_heads", "activation_kv_heads"),
                     ) -> jax.Array:
  """Pallas splash attention, one kernel call per batch row (vmapped), heads grouped natively.

  Under a mesh the kernel runs in `shard_map` (Mosaic kernels cannot be partitioned by XLA),
  split as the logical rules split the batch and the query and key/value heads (`head_names`)
  where the sizes divide (heads only when query and key/value heads split alike, which keeps
  each device's query heads with their key/value heads); the sequence is whole on each device.
  """
  local = functools.partial(_splash_local, causal=mask.causal, prefix=mask.prefix, config=config,
                            interpret=interpret)
  segments = () if mask.q_segments is None else (mask.q_segments, mask.kv_segments)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, *segments)

  def mesh_axes(name: str, size: int):
    axes = nn.logical_to_mesh_axes((name,))[0]
    named = (axes,) if isinstance(axes, str) else axes or ()
    return axes if size % math.prod(mesh.shape[a] for a in named) == 0 else None

  batch = mesh_axes("activation_batch", q.shape[0])
  heads = mesh_axes(head_names[0], q.shape[2])
  if heads != mesh_axes(head_names[1], k.shape[2]):
    heads = None
  spec = PartitionSpec(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, out_specs=spec, check_vma=False,
                       in_specs=(spec,) * 3 + (PartitionSpec(batch, None),) * len(segments))(
                           q, k, v, *segments)


def _splash_local(q, k, v, q_segments=None, kv_segments=None, *, causal: bool, prefix: int,
                  config: AttentionConfig, interpret: bool) -> jax.Array:
  """Splash attention on one device's rows and heads.

  The lengths are padded to whole blocks. Padding keys get segment id 0, which no real query has;
  with segment ids the queries and keys are one sequence (self-attention), padded alike, so every
  padding query sees at least itself. Without them the padding queries take id 1, as every real
  key, and so see some key.
  """
  batch, q_length, heads, head_dim = q.shape
  kv_length = k.shape[1]
  block_q = min(config.block_q, _round_up(q_length, 128))
  block_kv_compute = min(config.block_kv_compute, _round_up(kv_length, 128))
  block_kv = min(config.block_kv, _round_up(kv_length, block_kv_compute))
  if q_segments is not None:
    if q_length != kv_length:
      raise ValueError(f"splash attention with segment ids needs self-attention; got "
                       f"{q_length} queries and {kv_length} keys.")
    padded_q = padded_kv = _round_up(q_length, math.lcm(block_q, block_kv))
  else:
    padded_q, padded_kv = _round_up(q_length, block_q), _round_up(kv_length, block_kv)
  segment_ids = None
  if q_segments is not None:
    segment_ids = splash.SegmentIds(
        jnp.pad(q_segments.astype(jnp.int32), ((0, 0), (0, padded_q - q_length))),
        jnp.pad(kv_segments.astype(jnp.int32), ((0, 0), (0, padded_kv - kv_length))))
  elif (padded_q, padded_kv) != (q_length, kv_length):
    segment_ids = splash.SegmentIds(
        jnp.ones((batch, padded_q), jnp.int32),
        jnp.pad(jnp.ones((batch, kv_length), jnp.int32), ((0, 0), (0, padded_kv - kv_length))))

  shape = (padded_q, padded_kv)
  if not causal:
    head_mask = splash.FullMask(shape)
  else:
    head_mask = splash.CausalMask(shape)
    if prefix:
      prefix_mask = np.zeros(shape, bool)
      prefix_mask[:, :prefix] = True
      head_mask = head_mask | splash.NumpyMask(prefix_mask)
  block_sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv_compute,
      block_q_dq=block_q, block_kv_dq=block_kv)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads),
                                  block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)

  def heads_first(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q = heads_first(q * jnp.asarray(head_dim**-0.5, q.dtype), padded_q)
  k, v = heads_first(k, padded_kv), heads_first(v, padded_kv)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(kernel)(q, k, v, segment_ids=segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :q_length]
