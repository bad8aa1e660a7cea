"""QLLaMA (spec 2.2, 2.3): LLaMA with learnable queries that cross-attend to vision tokens.

The sequence is [queries; text]. Layers whose index is a multiple of `cross_attention_frequency`
add, after self-attention and before the MLP, a cross-attention from the query positions only to
the vision tokens: RMSNorm on both sides, q/k/v/o projections without biases, no RoPE, no mask,
residual into the query stream. Which positions see which is set by the mode (`MODES`): the text
encoder, the image encoder, and the three stage-2 objectives.

Layers are scanned in blocks of `cross_attention_frequency` layers, the first of each with
cross-attention, so every layer param has one leading axis of `num_blocks`: sub-layer `layer_j` of
block i is layer f * i + j of the reference. `llama_params` and `with_llama_params` move the
LLaMA weights between this layout and LLaMA's one-layer scan.

Captioning decodes with a `llama.KVCache` (`init_cache`, `QLlama.prefill`, `QLlama.decode`): the
first pass runs [queries; prompt] in "itg" mode, the only one that uses the vision tokens; later
tokens are plain causal LLaMA steps over the cached queries and text. That equals the uncached
"itg" forward, as there the queries never see the text and the text gets no cross-attention.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import QLlamaConfig
from internvl_jax.models import layers, llama, remat
from internvl_jax.models.attention import AttentionMask
from internvl_jax.models.llama import ACTIVATION

MODES = ("text", "image", "itc", "itm", "itg")


def attention_mask_and_positions(mode: str, text_mask: jax.Array, num_queries: int,
                                 slots: int = 1):
  """The `AttentionMask` over the mode's sequence and its (batch, T) positions.

  The sequence is [queries; text] (T = num_queries + length), the text alone in "text" mode, the
  queries alone in "image" mode (where `text_mask` has length 0). `text_mask` is True for real
  tokens. Queries always see each other and padded text is never seen; beyond that:
    "itc"  two separate encoders in one pass: the queries and the causal text are two segments;
    "itm"  one bidirectional joint encoder;
    "itg"  the text decodes from the queries: causal after a bidirectional prefix of queries.
  Queries sit at positions 0..num_queries-1 and the text follows; text positions count the real
  tokens before each token, as LLaMA's, so with right padding they are the reference's arange
  and, RoPE being relative, the "itc" text equals the "text" mode text.

  A packed "itg" row holds `slots` captions: the sequence is [queries of slot 1 .. queries of slot
  `slots`; captions], `text_mask` the captions' slots (segment ids 1..slots, 0 on padding). Each
  caption then sees only its own slot's queries and itself, at the positions it has alone.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown QLLaMA mode {mode!r}; known: {MODES}.")
  if slots != 1 and mode != "itg":
    raise ValueError(f"Only 'itg' rows pack several captions; got {slots} slots in {mode!r}.")
  text_only_mask, _, text_positions = llama.attention_mask_and_positions(text_mask, None)
  if mode == "text":
    return text_only_mask, text_positions
  batch, length = text_mask.shape
  if mode == "image" and length:
    raise ValueError("QLLaMA's image mode has no text.")
  query_positions = jnp.broadcast_to(jnp.tile(jnp.arange(num_queries, dtype=jnp.int32), slots),
                                     (batch, slots * num_queries))
  positions = jnp.concatenate([query_positions, num_queries + text_positions], axis=1)
  if mode == "image":
    return AttentionMask(), positions
  text_segment = 2 if mode == "itc" else 1
  query_segments = jnp.repeat(jnp.arange(1, slots + 1, dtype=jnp.int32), num_queries)
  segments = jnp.concatenate([jnp.broadcast_to(query_segments, (batch, slots * num_queries)),
                              text_segment * text_mask.astype(jnp.int32)], axis=1)
  causal = mode != "itm"
  mask = AttentionMask(segments, segments, causal=causal,
                       prefix=slots * num_queries if causal else 0)
  return mask, positions


class CrossAttention(layers.Attention):
  """The reference's LlamaCrossAttention: queries (`norm1`) attend to vision tokens (`norm2`).

  The text batch may be a multiple of the vision batch; row r then uses image r % vision batch,
  as the reference repeats its keys and values for the three stage-2 text batches.
  """

  norm_eps: float = 1e-6

  def setup(self):
    super().setup()
    self.norm1 = layers.RMSNorm(self.norm_eps, self.dtype)
    self.norm2 = layers.RMSNorm(self.norm_eps, self.dtype)

  def __call__(self, x: jax.Array, vision: jax.Array) -> jax.Array:
    k, v = self.keys_values(self.norm2(vision))
    repeats = (x.shape[0] // vision.shape[0], 1, 1, 1)
    return self.attend(self.query(self.norm1(x)), jnp.tile(k, repeats), jnp.tile(v, repeats))


class CrossAttentionDecoderLayer(llama.DecoderLayer):
  """A LLaMA layer whose query positions also attend to the vision tokens, between the
  self-attention and the MLP; without vision tokens (the text encoder) a plain LLaMA layer."""

  num_queries: int

  def setup(self):
    super().setup()
    cfg = self.config
    self.cross_attn = CrossAttention(cfg.num_heads, cfg.head_dim, cfg.hidden_size,
                                     norm_eps=cfg.norm_eps, dtype=cfg.compute_dtype,
                                     attention_config=cfg.attention)

  def __call__(self, x, vision, mask, positions, cache_index, layer_cache):
    """`vision` (batch, tokens, width), or (batch, slots, tokens, width) for packed rows: the row's
    query groups then attend to their own slot's image."""
    x, layer_cache = self.attention_step(x, mask, positions, cache_index, layer_cache)
    if vision is not None:
      slots = 1 if vision.ndim == 3 else vision.shape[1]
      batch, end = x.shape[0], slots * self.num_queries
      queries = x[:, :end].reshape(batch * slots, self.num_queries, x.shape[-1])
      queries = queries + self.cross_attn(queries, vision.reshape((-1,) + vision.shape[-2:]))
      x = jnp.concatenate([queries.reshape(batch, end, x.shape[-1]), x[:, end:]], axis=1)
      x = layers.constrain(x, ACTIVATION)
    return self.mlp_step(x), layer_cache


class QLlamaBlock(nn.Module):
  """`cross_attention_frequency` consecutive layers, the first with cross-attention.

  `block_cache` is None or the (keys, values) of the block's layers, each (frequency, batch,
  max_length, kv_heads, head_dim); the updated one is returned.
  """

  config: QLlamaConfig

  @nn.compact
  def __call__(self, x, vision, mask, positions, cache_index, block_cache):
    cfg, f = self.config, self.config.cross_attention_frequency
    caches = [None] * f if block_cache is None else list(zip(*block_cache))
    x, caches[0] = CrossAttentionDecoderLayer(cfg.text, cfg.num_queries, name="layer_0")(
        x, vision, mask, positions, cache_index, caches[0])
    for j in range(1, f):
      x, caches[j] = llama.DecoderLayer(cfg.text, name=f"layer_{j}")(
          x, mask, positions, cache_index, caches[j])
    if block_cache is None:
      return x, None
    return x, tuple(jnp.stack(kv) for kv in zip(*caches))


@flax.struct.dataclass
class QLlamaOutput:
  queries: jax.Array | None  # (batch, num_queries, width) after the final norm; None in "text" mode
  text: jax.Array | None  # (batch, length, width) after the final norm; None in "image" mode


def _check_inputs(config: QLlamaConfig, modes, tokens, attention_mask, vision):
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"Unknown QLLaMA mode {mode!r}; known: {MODES}.")
  if len(modes) > 1 and not set(modes) <= {"itc", "itm", "itg"}:
    raise ValueError(f"Only the modes with queries and text can share a pass; got {modes}.")
  mode = modes[0]
  if (tokens is None) != (mode == "image"):
    raise ValueError(f"QLLaMA's {mode!r} mode takes {'no ' if mode == 'image' else ''}tokens.")
  if (vision is None) != (mode == "text"):
    raise ValueError(f"QLLaMA's {mode!r} mode takes {'no ' if mode == 'text' else ''}vision "
                     "features.")
  if tokens is not None:
    llama.check_tokens(tokens, attention_mask)
    if tokens.shape[0] % len(modes):
      raise ValueError(f"a batch of {tokens.shape[0]} rows does not split into the {len(modes)} "
                       f"modes {modes}.")
  if vision is not None:
    if vision.ndim not in (3, 4) or vision.shape[-1] != config.vision_width:
      raise ValueError(f"vision features must be (batch, tokens, {config.vision_width}), or (batch, "
                       f"slots, tokens, {config.vision_width}) for packed 'itg' rows; got shape "
                       f"{vision.shape}.")
    if vision.ndim == 4 and (modes != ("itg",) or tokens.shape[0] != vision.shape[0]):
      raise ValueError(f"vision features with a slot axis {vision.shape} take 'itg' rows of one "
                       f"batch; got modes {modes} and tokens of shape {tokens.shape}.")
    if tokens is not None and tokens.shape[0] % vision.shape[0]:
      raise ValueError(f"the text batch {tokens.shape[0]} is not a multiple of the vision batch "
                       f"{vision.shape[0]}.")


def _text_mask(tokens, attention_mask):
  """Nonzero for real tokens (transformers' mask, or a packed row's slots; default: all real)."""
  return jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask


class QLlama(nn.Module):
  """[queries; text] -> final-normed query and text states; `logits` maps text states to the LM's
  logits."""

  config: QLlamaConfig

  def setup(self):
    cfg, text_cfg = self.config, self.config.text
    self.query_tokens = self.param(
        "query_tokens", layers.logical_param(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, cfg.num_queries, text_cfg.hidden_size))
    self.embed_tokens = llama.token_embedding(text_cfg)
    self.layers = nn.scan(
        remat.remat(QLlamaBlock, text_cfg.remat_policy), variable_axes={"params": 0},
        split_rngs={"params": True}, in_axes=(nn.broadcast,) * 4 + (0,), length=cfg.num_blocks,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.norm = layers.RMSNorm(text_cfg.norm_eps, text_cfg.compute_dtype)
    self.lm_head = llama.lm_head(text_cfg)

  def __call__(self, tokens: jax.Array | None, attention_mask: jax.Array | None,
               vision: jax.Array | None, *, mode: str | tuple[str, ...]) -> QLlamaOutput:
    """`tokens` (batch, length) with transformers' `attention_mask` (default: all real), None in
    "image" mode; `vision` (batch, tokens, vision_width) InternViT features, None in "text" mode.

    `mode` may be a tuple of the modes with queries and text ("itc", "itm", "itg"): the batch is
    then that many equal chunks, each under its own mode, as stage 2 runs its three objectives
    in one pass.

    Packed "itg" rows (stage 2's packed captions): `vision` (batch, slots, tokens, vision_width),
    a row's images, and `attention_mask` the slot of each caption token (1..slots, 0 on padding);
    the row is [queries of each slot; captions] (`attention_mask_and_positions`), and the query
    outputs are (batch, slots * num_queries, width).
    """
    cfg = self.config
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    _check_inputs(cfg, modes, tokens, attention_mask, vision)
    slots = 1 if vision is None or vision.ndim == 3 else vision.shape[1]
    if modes == ("image",):
      text_mask = jnp.ones((vision.shape[0], 0), bool)
    else:
      text_mask = _text_mask(tokens, attention_mask)
    batch = text_mask.shape[0]
    parts = []
    if modes != ("text",):
      parts.append(self._queries(batch, slots))
    if modes != ("image",):
      parts.append(self.embed_tokens(tokens))
    x = layers.constrain(jnp.concatenate(parts, axis=1), ACTIVATION)
    masks, positions = zip(*(attention_mask_and_positions(m, chunk, cfg.num_queries, slots)
                             for m, chunk in zip(modes, jnp.split(text_mask, len(modes)))))
    mask = masks[0] if len(masks) == 1 else masks
    positions = jnp.concatenate(positions, axis=0)

    x, _ = self.layers(x, vision, mask, positions, None, None)
    x = self.norm(x)
    num_queries = 0 if modes == ("text",) else slots * cfg.num_queries
    return QLlamaOutput(queries=x[:, :num_queries] if num_queries else None,
                        text=None if modes == ("image",) else x[:, num_queries:])

  def logits(self, text: jax.Array) -> jax.Array:
    """(batch, length, vocab) float32 LM logits of final-normed text states."""
    return llama.lm_logits(text, self.embed_tokens, self.lm_head)

  def prefill(self, tokens: jax.Array, attention_mask: jax.Array | None, vision: jax.Array,
              cache: llama.KVCache) -> tuple[jax.Array, llama.KVCache]:
    """Captioning's first pass: [queries; prompt] in "itg" mode, cross-attending to `vision`.

    Starts a new sequence in `cache` (from `init_cache`; what it held is dropped). Returns the
    prompt's (batch, length, vocab) float32 logits and the cache, which then holds the keys and
    values of the queries and the prompt: the vision tokens are not needed again.
    """
    cfg = self.config
    _check_inputs(cfg, ("itg",), tokens, attention_mask, vision)
    text_mask = _text_mask(tokens, attention_mask)
    batch, length = tokens.shape
    used = cfg.num_queries + length
    if used > cache.max_length:
      raise ValueError(f"the {cfg.num_queries} queries and a prompt of {length} tokens do not fit "
                       f"a cache of {cache.max_length} slots.")
    mask, positions = attention_mask_and_positions("itg", text_mask, cfg.num_queries)
    free = cache.max_length - used
    # The keys are the whole cache, its free slots padding; the queries start it.
    kv_segments = jnp.pad(mask.kv_segments, ((0, 0), (0, free)))
    mask = mask.replace(kv_segments=kv_segments, query_start=jnp.zeros((), jnp.int32))
    valid = kv_segments > 0
    x = jnp.concatenate([self._queries(batch), self.embed_tokens(tokens)], axis=1)
    x, cache = self._cached_layers(x, vision, mask, positions, cache.replace(
        valid=valid, index=jnp.zeros((), jnp.int32)))
    return self.logits(x[:, cfg.num_queries:]), cache

  def decode(self, tokens: jax.Array, cache: llama.KVCache) -> tuple[jax.Array, llama.KVCache]:
    """Text tokens after `prefill`, appended to `cache`: (batch, length, vocab) float32 logits.

    A plain causal LLaMA pass: the tokens see all cached queries and the real text before them,
    and get no cross-attention (the reference skips it for 1-token steps, and text positions never
    have it). Positions continue each row's text after its real tokens.
    """
    llama.check_tokens(tokens, None)
    mask, valid, positions = llama.attention_mask_and_positions(jnp.ones(tokens.shape, bool), cache)
    x, cache = self._cached_layers(self.embed_tokens(tokens), None, mask, positions,
                                   cache.replace(valid=valid))
    return self.logits(x), cache

  def _queries(self, batch: int, slots: int = 1) -> jax.Array:
    """(batch, slots * num_queries, width): the learned queries, once per slot."""
    queries = jnp.tile(self.query_tokens.astype(self.config.text.compute_dtype), (1, slots, 1))
    return jnp.broadcast_to(queries, (batch,) + queries.shape[1:])

  def _cached_layers(self, x, vision, mask, positions, cache: llama.KVCache):
    """The layers and final norm over `x`, written to `cache` from `cache.index` on (its `valid`
    already covering `x`)."""
    f = self.config.cross_attention_frequency
    # The cache rows are the reference's layers, f * i + j, so the scan's blocks are a reshape.
    to_blocks = lambda a: a.reshape((-1, f) + a.shape[1:])
    x = layers.constrain(x, ACTIVATION)
    x, (keys, values) = self.layers(x, vision, mask, positions, cache.index,
                                    (to_blocks(cache.keys), to_blocks(cache.values)))
    to_layers = lambda a: a.reshape((-1,) + a.shape[2:])
    cache = cache.replace(keys=to_layers(keys), values=to_layers(values),
                          index=cache.index + x.shape[1])
    return self.norm(x), cache


def init_cache(config: QLlamaConfig, batch: int, max_length: int) -> llama.KVCache:
  """An empty cache for the queries and `max_length` text tokens (prompt plus generated ones).

  It is LLaMA's cache, one row per layer in the reference's order, so beam search reorders it and
  sharding treats it like any other.
  """
  return llama.init_cache(config.text, batch, config.num_queries + max_length)


def _example_inputs(config: QLlamaConfig):
  return (jax.ShapeDtypeStruct((1, 2), jnp.int32),
          jax.ShapeDtypeStruct((1, 1, config.vision_width), jnp.float32))


def _init(config: QLlamaConfig, seed: int, tokens, vision):
  # Queries, text, cross-attention and the LM head: every param.
  touch_all = lambda model, t, v: model.logits(model(t, None, v, mode="itg").text)
  return QLlama(config).init(jax.random.key(seed), tokens, vision, method=touch_all)


def abstract_params(config: QLlamaConfig) -> dict:
  """Param shapes and dtypes, with nothing allocated."""
  variables = jax.eval_shape(lambda t, v: _init(config, 0, t, v), *_example_inputs(config))
  return nn.meta.unbox(variables["params"])


def init_params(config: QLlamaConfig, seed: int = 0) -> dict:
  inputs = [jnp.zeros(x.shape, x.dtype) for x in _example_inputs(config)]
  variables = jax.jit(lambda t, v: _init(config, seed, t, v))(*inputs)
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))


def llama_params(params: dict, config: QLlamaConfig) -> dict:
  """The LLaMA params inside QLLaMA params, in `llama.Llama`'s layout: the text tower that
  InternVL-C uses (queries and cross-attention left out)."""
  f = config.cross_attention_frequency
  sub_layers = [params["layers"][f"layer_{j}"] for j in range(f)]
  sub_layers[0] = {name: tree for name, tree in sub_layers[0].items() if name != "cross_attn"}
  # Layer f * i + j is block i, sub-layer j: stack the sub-layers on axis 1, merge the two axes.
  merged = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:]),
                        *sub_layers)
  out = {name: tree for name, tree in params.items() if name not in ("layers", "query_tokens")}
  return out | {"layers": merged}


def with_llama_params(params: dict, llama_tree: dict, config: QLlamaConfig) -> dict:
  """QLLaMA params whose LLaMA weights are `llama_tree` (`llama.Llama`'s layout), keeping the
  queries and cross-attention of `params`: stage 2 starts QLLaMA from the stage-1 text tower."""
  f, num_blocks = config.cross_attention_frequency, config.num_blocks
  layer_stack = dict(params["layers"])
  for j in range(f):
    split = jax.tree.map(lambda x: x.reshape((num_blocks, f) + x.shape[1:])[:, j],
                         llama_tree["layers"])
    layer_stack[f"layer_{j}"] = dict(layer_stack[f"layer_{j}"]) | split
  shared = {name: tree for name, tree in llama_tree.items() if name != "layers"}
  return dict(params) | shared | {"layers": layer_stack}
