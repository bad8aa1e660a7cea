"""InternVL-Chat (spec 4.4): image tiles -> InternViT -> projector -> LLM tokens, spliced into the
prompt where its <IMG_CONTEXT> tokens are.

Per tile: InternViT's hidden state `select_layer` without the CLS token, then by variant
  "v1.0"   `mlp1` (Linear -> GELU -> Linear): one LLM token per patch;
  "qllama" also QLLaMA's query outputs (image mode, over the last block's tokens) through `mlp2`:
           tokens [queries; patches];
  "v1.5"   pixel shuffle (each token merges a block of patches), then `mlp1` with a LayerNorm.
The LLM is `llama.Llama`: its token embeddings of the prompt are computed, the image-context
ones are overwritten with the tiles' features in order (`splice`), and the layers run on that.
Generation (`ChatDecoder`) does this in the prefill only; every later step is a plain LLaMA step.

A batch holds a fixed number of tile slots per row, `tile_count` of them real (the data side's
`tiles` and `tile_count`); padding slots go through the ViT too (shapes are static) but supply no
tokens.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import ChatConfig
from internvl_jax.models import layers, llama
from internvl_jax.models.intern_vit import InternViT, select_layer
from internvl_jax.models.qllama import QLlama


def pixel_shuffle(x: jax.Array, scale: float, version: str) -> jax.Array:
  """The reference's pixel shuffle of a (n, w, h, c) grid: (n, h s, w s, c / s^2) for "v1",
  whose grid is transposed, or (n, w s, h s, c / s^2) for "v2", which swaps it back.

  With s = 1/2, "v2" output [i, j] is the concatenation of input [2i + a, 2j + b] over
  (a, b) = (0, 0), (0, 1), (1, 0), (1, 1); "v1" output [j, i] holds the same.
  """
  if version not in ("v1", "v2"):
    raise ValueError(f"Unknown pixel shuffle version {version!r}; known: ('v1', 'v2').")
  n, w, h, c = x.shape
  x = x.reshape(n, w, int(h * scale), int(c / scale))
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
  return x if version == "v1" else x.transpose(0, 2, 1, 3)


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_image_tokens(tokens, image_context_id: int, num_features) -> None:
  """Raises a ValueError naming the rows whose image-context token count is not their number of
  image features. Takes concrete arrays: check host batches with it before a jitted step."""
  counts = np.sum(np.asarray(tokens) == image_context_id, axis=1)
  expected = np.broadcast_to(np.asarray(num_features), counts.shape)
  bad = np.flatnonzero(counts != expected)
  if bad.size:
    rows = ", ".join(f"row {r}: {counts[r]} tokens, {expected[r]} features" for r in bad[:8])
    raise ValueError(f"The image-context token (id {image_context_id}) count does not match the "
                     f"image features: {rows}. Each real tile needs exactly its image tokens in "
                     "the prompt.")


def splice(embeddings: jax.Array, tokens: jax.Array, image_context_id: int, features: jax.Array,
           num_features: jax.Array) -> jax.Array:
  """Writes image features over the embeddings of the image-context tokens, in order.

  `embeddings` (batch, length, width) of `tokens` (batch, length); `features` (batch, slots,
  width): row b's real tiles' features, flattened tile by tile, the first `num_features[b]` real.
  The k-th image-context token of row b takes features[b, k]: with every row's counts equal, this
  is the reference's order (all real tiles of the batch, flattened, over all image-context tokens
  row by row). Counts are checked when the arrays are concrete; under `jit` they cannot be, so
  check host batches with `check_image_tokens` first (a traced mismatch goes unnoticed: surplus
  image tokens take the features of padding slots).
  """
  if _is_concrete(tokens, num_features):
    check_image_tokens(tokens, image_context_id, num_features)
  is_context = tokens == image_context_id
  rank = jnp.clip(jnp.cumsum(is_context, axis=1) - 1, 0, features.shape[1] - 1)
  picked = jnp.take_along_axis(features, rank[:, :, None], axis=1)
  return jnp.where(is_context[:, :, None], picked.astype(embeddings.dtype), embeddings)


class Projector(nn.Module):
  """[LayerNorm ->] Linear -> exact GELU -> Linear: the reference's `mlp1` / `mlp2`."""

  out_dim: int
  norm_eps: float | None = None  # None: no LayerNorm
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.norm_eps is not None:
      x = layers.make_norm("layer_norm", self.norm_eps, self.dtype, "norm")(x)
    h = layers.dense(self.out_dim, ("embed", "mlp"), dtype=self.dtype, name="linear_1")(x)
    h = layers.constrain(nn.gelu(h, approximate=False),
                         ("activation_batch", "activation_length", "activation_mlp"))
    return layers.dense(self.out_dim, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(h)


def check_inputs(config: ChatConfig, tiles, tile_count, tokens, attention_mask):
  """Fails with a message that says what is wrong with a batch: its shapes, and its image token
  counts when they are concrete."""
  llama.check_tokens(tokens, attention_mask)
  size, channels = config.image_size, config.vision.num_channels
  if tiles.ndim != 5 or tiles.shape[2:] != (size, size, channels):
    raise ValueError(f"tiles must be (batch, tiles, {size}, {size}, {channels}) for this config's "
                     f"{size}-px tiles; got shape {tiles.shape}.")
  if tiles.shape[0] != tokens.shape[0] or tile_count.shape != (tokens.shape[0],):
    raise ValueError(f"tiles {tiles.shape}, tile_count {tile_count.shape} and tokens "
                     f"{tokens.shape} disagree on the batch size.")
  if _is_concrete(tokens, tile_count):
    check_image_tokens(tokens, config.image_context_id, tile_count * config.num_image_tokens)


class InternVLChat(nn.Module):
  """(tiles, tile_count, tokens, attention_mask) -> LLM logits with the images spliced in."""

  config: ChatConfig

  def setup(self):
    cfg = self.config
    width, dtype = cfg.llm.hidden_size, cfg.llm.compute_dtype
    self.vision_model = InternViT(cfg.vision)
    self.mlp1 = Projector(width, cfg.projector_eps if cfg.variant == "v1.5" else None, dtype)
    if cfg.variant == "qllama":
      self.qllama = QLlama(cfg.qllama)
      self.mlp2 = Projector(width, None, dtype)
    self.language_model = llama.Llama(cfg.llm)

  def encode_tiles(self, tiles: jax.Array) -> jax.Array:
    """(n, size, size, channels) tiles -> (n, num_image_tokens, LLM width) features."""
    cfg = self.config
    out = self.vision_model(tiles, return_hidden_states=cfg.select_layer != -1)
    patches = select_layer(out, cfg.select_layer)[:, 1:]
    if cfg.variant == "v1.5":
      grid = cfg.grid_size
      patches = pixel_shuffle(patches.reshape(len(tiles), grid, grid, -1), cfg.downsample_ratio,
                              cfg.ps_version)
      patches = patches.reshape(len(tiles), -1, patches.shape[-1])
    features = self.mlp1(patches)
    if cfg.variant == "qllama":
      queries = self.qllama(None, None, out.last_hidden_state, mode="image").queries
      features = jnp.concatenate([self.mlp2(queries), features], axis=1)
    return features

  def embed(self, tiles, tile_count, tokens) -> jax.Array:
    """The prompt's token embeddings with the real tiles' features over its image tokens."""
    batch, slots = tiles.shape[:2]
    per_tile = self.config.num_image_tokens
    features = self.encode_tiles(tiles.reshape((batch * slots,) + tiles.shape[2:]))
    features = features.reshape(batch, slots * per_tile, features.shape[-1])
    return splice(self.language_model.embed(tokens), tokens, self.config.image_context_id,
                  features, tile_count * per_tile)

  def llm_output(self, tiles, tile_count, tokens, attention_mask=None, cache=None, *,
                 return_logits: bool = True) -> llama.LlamaOutput:
    """The LLM's output on the prompt with its images, appended to `cache` if given. Training
    skips the logits: its loss projects the hidden state itself (`llama.head_kernel`)."""
    check_inputs(self.config, tiles, tile_count, tokens, attention_mask)
    return self.language_model(None, attention_mask, cache=cache, return_logits=return_logits,
                               embeddings=self.embed(tiles, tile_count, tokens))

  def prefill(self, tiles, tile_count, tokens, attention_mask=None, cache=None):
    """(float32 logits, cache) of the prompt with its images, appended to `cache` if given."""
    out = self.llm_output(tiles, tile_count, tokens, attention_mask, cache)
    return out.logits, out.cache

  def __call__(self, tiles: jax.Array, tile_count: jax.Array, tokens: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """(batch, length, vocab) float32 logits.

    `tiles` (batch, slots, size, size, channels) NHWC, ImageNet-normalized, the first
    `tile_count[b]` slots of row b real; `tokens` (batch, length) with `num_image_tokens`
    image-context tokens per real tile; `attention_mask` transformers' (default: all real).
    """
    return self.prefill(tiles, tile_count, tokens, attention_mask)[0]


@dataclasses.dataclass(frozen=True)
class ChatDecoder:
  """InternVL-Chat as a `generate.Decoder`; `context` is {"tiles", "tile_count"}.

  The prefill splices the images into the prompt; the steps are LLaMA steps on the cache, which
  read only the LLM's params.
  """

  config: ChatConfig

  def init_cache(self, batch, max_length):
    return llama.init_cache(self.config.llm, batch, max_length)

  def prefill(self, params, tokens, attention_mask, cache, context):
    return InternVLChat(self.config).apply(
        {"params": params}, context["tiles"], context["tile_count"], tokens, attention_mask, cache,
        method=InternVLChat.prefill)

  def step(self, params, tokens, cache, context):
    del context  # the images are in the cache
    out = llama.Llama(self.config.llm).apply({"params": params["language_model"]}, tokens,
                                             cache=cache)
    return out.logits, out.cache


def _example_inputs(config: ChatConfig):
  size, channels = config.image_size, config.vision.num_channels
  return (jax.ShapeDtypeStruct((1, 1, size, size, channels), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.int32),
          jax.ShapeDtypeStruct((1, config.num_image_tokens), jnp.int32))


def _init(config: ChatConfig, seed: int, tiles, tile_count, tokens):
  return InternVLChat(config).init(jax.random.key(seed), tiles, tile_count, tokens)


def abstract_params(config: ChatConfig) -> dict:
  """Param shapes and dtypes, with nothing allocated."""
  variables = jax.eval_shape(lambda *x: _init(config, 0, *x), *_example_inputs(config))
  return nn.meta.unbox(variables["params"])


def init_params(config: ChatConfig, seed: int = 0) -> dict:
  tiles, tile_count, _ = _example_inputs(config)
  tokens = jnp.full((1, config.num_image_tokens), config.image_context_id, jnp.int32)
  variables = jax.jit(lambda *x: _init(config, seed, *x))(
      jnp.zeros(tiles.shape), jnp.ones(tile_count.shape, jnp.int32), tokens)
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
