"""LLaMA decoder (spec 2.1): InternVL's text encoder, QLLaMA's base and the chat LLMs.

The chat LLM families (LLaMA / Yi / LLaMA-3, InternLM2, Qwen2, Phi-3; chat spec 2) are this one
decoder configured by `LlamaConfig`: q/k/v biases, RoPE base and scaling, tied head, sizes.

Token embedding -> scanned pre-norm layers (RMSNorm, causal self-attention with rotary positions
and multi-head or grouped-query heads, RMSNorm, SwiGLU MLP) -> final RMSNorm -> LM head (or the
transposed embedding when tied). Params are named after transformers' `LlamaForCausalLM`, so the
conversion table is a list of renames.

Incremental decoding uses an explicit `KVCache` pytree that the caller passes in and gets back,
rather than a mutable flax collection: the cache is plain data, so it is allocated from the config
without running the model, scanned over layers like the params, reordered for beam search by
indexing, and donated or sharded like any other array.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import LlamaConfig
from internvl_jax.models import layers, remat
from internvl_jax.models.attention import AttentionMask

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for the tokens decoded so far.

  Every row writes the same slot (`index`), so prompts of different lengths are decoded in one
  batch: `valid` marks the slots that hold real tokens, and the padding slots stay invisible.
  """

  keys: jax.Array  # (layers, batch, max_length, kv_heads, head_dim), in the compute dtype
  values: jax.Array
  valid: jax.Array  # (batch, max_length) bool
  index: jax.Array  # () int32: the next slot to write

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]

  def take(self, rows: jax.Array) -> "KVCache":
    """The cache of the given batch rows (beam search reorders and repeats rows)."""
    return KVCache(self.keys[:, rows], self.values[:, rows], self.valid[rows], self.index)


def init_cache(config: LlamaConfig, batch: int, max_length: int) -> KVCache:
  """An empty cache for `max_length` tokens: prompt plus generated ones.

  Writes past `max_length` would be clamped by XLA, so the caller sizes the cache for the whole
  sequence (`generate` does).
  """
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return KVCache(keys=jnp.zeros(shape, config.compute_dtype),
                 values=jnp.zeros(shape, config.compute_dtype),
                 valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class LlamaOutput:
  logits: jax.Array | None  # (batch, length, vocab) float32; None when not asked for
  hidden_state: jax.Array  # (batch, length, width): the last layer's output after the final norm
  cache: KVCache | None = None


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """(batch, length) positions: the number of real tokens before each token in its own sample.

  `segment_ids` are 0 for padding and non-decreasing over each row's real tokens (1, 1, 2, 2, 2,
  0, ...: a packed row); a sample starts where the id exceeds every id before it, so a 0/1 mask
  counts 0, 1, 2, ... from its first real token whether padded on the left or right. Padding
  continues the count of the sample before it (right padding: the reference's arange clipped).
  """
  real = segment_ids > 0
  counts = jnp.cumsum(real, axis=1)
  earlier_max = jax.lax.cummax(jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1], axis=1)
  slots = jnp.arange(segment_ids.shape[1])
  start = jax.lax.cummax(jnp.where(segment_ids > earlier_max, slots, -1), axis=1)
  before_start = jnp.take_along_axis(counts - real, jnp.maximum(start, 0), axis=1)
  return jnp.maximum(counts - 1 - jnp.where(start >= 0, before_start, 0), 0).astype(jnp.int32)


def attention_mask_and_positions(attention_mask: jax.Array, cache: KVCache | None):
  """The causal `AttentionMask`, the cache's new `valid` and default positions.

  `attention_mask` is transformers' (True / 1 for real tokens) or, for packed rows, segment ids
  (`segment_positions`). A token sees the real tokens of its own sample at or before its slot.
  Positions restart at each sample; a decoding step continues each row where its own prompt
  ended (the cache holds one sample per row).
  """
  segments = attention_mask.astype(jnp.int32)
  if cache is None:
    mask = AttentionMask(segments, segments, causal=True)
    return mask, segments > 0, segment_positions(segments)
  key_valid = jax.lax.dynamic_update_slice(cache.valid, segments > 0, (0, cache.index))
  before = jnp.sum(cache.valid, axis=1, keepdims=True)
  positions = jnp.maximum(before + jnp.cumsum(segments > 0, axis=1) - 1, 0).astype(jnp.int32)
  mask = AttentionMask((segments > 0).astype(jnp.int32), key_valid.astype(jnp.int32),
                       query_start=cache.index, causal=True)
  return mask, key_valid, positions


class DecoderLayer(nn.Module):
  """x += attn(norm(x)); x += mlp(norm(x)). With a cache, new keys and values are written first.

  The two residual steps are separate methods so that QLLaMA's layer can put its cross-attention
  between them without repeating them.
  """

  config: LlamaConfig

  def setup(self):
    cfg, dtype = self.config, self.config.compute_dtype
    self.input_layernorm = layers.RMSNorm(cfg.norm_eps, dtype)
    self.self_attn = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.num_kv_heads,
                                      use_bias=cfg.qkv_bias, out_bias=False, rope_base=cfg.rope_base,
                                      rope_scaling=cfg.rope_scaling, dtype=dtype,
                                      attention_config=cfg.attention)
    self.post_attention_layernorm = layers.RMSNorm(cfg.norm_eps, dtype)
    self.mlp = layers.GatedMlp(cfg.mlp_dim, dtype)

  def attention_step(self, x, mask, positions, cache_index, layer_cache):
    h = self.input_layernorm(x)
    num_keys = x.shape[1] if layer_cache is None else cache_index + x.shape[1]
    rope_length = layers.rope_length(self.config.rope_scaling, positions, num_keys)
    q = self.self_attn.query(h, positions, rope_length)
    k, v = self.self_attn.keys_values(h, positions, rope_length)
    if layer_cache is not None:
      layer_cache = tuple(
          jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), cache_index, axis=1)
          for cached, new in zip(layer_cache, (k, v)))
      k, v = layer_cache
    return layers.constrain(x + self.self_attn.attend(q, k, v, mask), ACTIVATION), layer_cache

  def mlp_step(self, x):
    return layers.constrain(x + self.mlp(self.post_attention_layernorm(x)), ACTIVATION)

  def __call__(self, x, mask, positions, cache_index, layer_cache):
    x, layer_cache = self.attention_step(x, mask, positions, cache_index, layer_cache)
    return self.mlp_step(x), layer_cache


def token_embedding(config: LlamaConfig) -> nn.Embed:
  """The `embed_tokens` table (create it in `setup` or a compact method, like `lm_head`)."""
  return layers.Embed(
      config.vocab_size, config.hidden_size, dtype=config.compute_dtype, name="embed_tokens",
      embedding_init=layers.logical_param(nn.initializers.normal(0.02), ("vocab", "embed")))


def lm_head(config: LlamaConfig) -> layers.Dense | None:
  """The `lm_head` projection; None when tied (the logits then use the transposed embedding)."""
  if config.tie_embeddings:
    return None
  return layers.dense(config.vocab_size, ("embed", "vocab"), use_bias=False,
                      dtype=config.compute_dtype, name="lm_head")


def lm_logits(x: jax.Array, embed: nn.Embed, head: layers.Dense | None) -> jax.Array:
  """float32 logits from `lm_head`, or from the embedding when tied (`head` None)."""
  logits = embed.attend(x) if head is None else head(x)
  logits = layers.constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
  return logits.astype(jnp.float32)


def head_kernel(config: LlamaConfig, params: dict) -> jax.Array:
  """The (width, vocab) head of a decoder's params: `lm_head`'s kernel, or the transposed
  embedding when tied; what `losses.chunked_lm_example_losses` projects the hidden states with."""
  if config.tie_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def check_tokens(tokens, attention_mask):
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids of shape (batch, length); got {tokens.dtype} "
                     f"{tokens.shape}.")
  if attention_mask is not None and attention_mask.shape != tokens.shape:
    raise ValueError(f"attention_mask has shape {attention_mask.shape}, tokens {tokens.shape}.")


class Llama(nn.Module):
  """Token ids (or their embeddings) -> logits and final-normed hidden states, optionally
  appending to a KV cache.

  `embed` and `embeddings=` let a caller change the embedded sequence before the layers run:
  InternVL-Chat writes image features over the embeddings of its image-context tokens.
  """

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = token_embedding(cfg)
    self.layers = nn.scan(
        remat.remat(DecoderLayer, cfg.remat_policy), variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.norm = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype)
    self.lm_head = lm_head(cfg)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """(batch, length, width) token embeddings in the compute dtype."""
    return self.embed_tokens(tokens)

  def __call__(self, tokens: jax.Array | None, attention_mask: jax.Array | None = None, *,
               embeddings: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None, return_logits: bool = True) -> LlamaOutput:
    """`tokens` (batch, length), or None with `embeddings` (batch, length, width) given instead.

    `attention_mask` is transformers': 1 for real tokens, 0 for padding (default: all real), or
    a packed row's segment ids (`segment_positions`). `positions` default to the number of real
    tokens before each token in its sample (cache included).
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError("Llama takes either tokens or embeddings, not both or neither.")
    if tokens is not None:
      check_tokens(tokens, attention_mask)
      embeddings = self.embed(tokens)
    elif embeddings.ndim != 3 or embeddings.shape[-1] != self.config.hidden_size:
      raise ValueError(f"embeddings must be (batch, length, {self.config.hidden_size}); got shape "
                       f"{embeddings.shape}.")
    elif attention_mask is not None and attention_mask.shape != embeddings.shape[:2]:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, embeddings "
                       f"{embeddings.shape[:2]}.")
    if attention_mask is None:
      attention_mask = jnp.ones(embeddings.shape[:2], bool)
    mask, key_valid, default_positions = attention_mask_and_positions(attention_mask, cache)
    positions = default_positions if positions is None else positions

    x = layers.constrain(embeddings.astype(self.config.compute_dtype), ACTIVATION)
    layer_cache = None if cache is None else (cache.keys, cache.values)
    x, layer_cache = self.layers(x, mask, positions, None if cache is None else cache.index,
                                 layer_cache)
    x = self.norm(x)

    logits = lm_logits(x, self.embed_tokens, self.lm_head) if return_logits else None
    if cache is not None:
      cache = KVCache(*layer_cache, valid=key_valid, index=cache.index + x.shape[1])
    return LlamaOutput(logits=logits, hidden_state=x, cache=cache)


def abstract_params(config: LlamaConfig) -> dict:
  """Param shapes and dtypes, with nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda t: Llama(config).init(jax.random.key(0), t), tokens)
  return nn.meta.unbox(variables["params"])


def init_params(config: LlamaConfig, seed: int = 0) -> dict:
  variables = jax.jit(Llama(config).init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
