"""InternVL-C and InternVL-G (spec 3, 4.2, 9): contrastive image and text embeddings, and the
stage-2 objectives.

InternVL-C. Image: InternViT's last-block tokens -> attention pooling (`clip_projector`) ->
L2-normalized. Text: the LLaMA tower's final-normed hidden state at the last real token (the
appended EOS) -> `text_projection` (stored [in, out], used as x @ W) -> L2-normalized.

InternVL-G holds QLLaMA instead of the plain LLaMA tower (its LLaMA weights are the text tower,
run in QLLaMA's text mode). Its image embedding adds the normalized attention pooling
(`clip_projector2`) of QLLaMA's query outputs to InternVL-C's, and normalizes again. Stage 2
runs the three text batches (ITM, ITC, ITG) against one image batch in one QLLaMA pass.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import AttentionConfig, InternVLConfig
from internvl_jax.models import layers
from internvl_jax.models.intern_vit import InternViT
from internvl_jax.models.llama import Llama
from internvl_jax.models.qllama import QLlama


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class AttentionPooling(nn.Module):
  """The reference's AttentionPoolingBlock: one query, the mean of all tokens, attends to them.

  Three LayerNorms (query, keys, values) with eps 1e-5, q/k/v projections with biases, an output
  projection to `out_dim`; no residual and no MLP.
  """

  num_heads: int
  out_dim: int
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  attention_config: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    norm = lambda name: layers.make_norm("layer_norm", self.eps, self.dtype, name)
    attn = layers.Attention(self.num_heads, width // self.num_heads, self.out_dim, use_bias=True,
                            dtype=self.dtype, attention_config=self.attention_config,
                            name="cross_attn")
    query = norm("norm_q")(jnp.mean(x, axis=1, keepdims=True))
    keys, values = attn.k_proj(norm("norm_k")(x)), attn.v_proj(norm("norm_v")(x))
    return attn.attend(attn.query(query), keys, values)[:, 0]


def last_token_features(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The hidden state at each row's last real token (right padding: mask.sum - 1)."""
  last = jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class _DualEncoder(nn.Module):
  """What InternVL-C and -G share: InternViT with `clip_projector`, the text projection, the
  logit scale."""

  config: InternVLConfig

  def setup(self):
    cfg = self.config
    self.vision_model = InternViT(cfg.vision)
    self.clip_projector = AttentionPooling(cfg.attn_pool_heads, cfg.embed_dim, cfg.attn_pool_eps,
                                           cfg.vision.compute_dtype, cfg.vision.attention)
    self.text_projection = self.param(
        "text_projection", layers.logical_param(layers.default_kernel_init, ("embed", None)),
        (cfg.text.hidden_size, cfg.embed_dim))
    self.logit_scale = self.param(
        "logit_scale", layers.logical_param(nn.initializers.constant(cfg.logit_scale_init), ()), ())

  def project_text(self, hidden, attention_mask) -> jax.Array:
    """The normalized embedding of the text states at each row's last real token."""
    features = last_token_features(hidden, attention_mask)
    return l2_normalize(features @ self.text_projection.astype(features.dtype))


class InternVLC(_DualEncoder):
  """InternVL-C (spec 3.2): pooled InternViT tokens vs the LLaMA text tower's EOS feature."""

  def setup(self):
    super().setup()
    self.text_model = Llama(self.config.text)

  def encode_image(self, pixels, *, train: bool = False, keep_fraction: float = 1.0) -> jax.Array:
    tokens = self.vision_model(pixels, train=train, keep_fraction=keep_fraction).last_hidden_state
    return l2_normalize(self.clip_projector(tokens))

  def encode_text(self, tokens, attention_mask) -> jax.Array:
    hidden = self.text_model(tokens, attention_mask, return_logits=False).hidden_state
    return self.project_text(hidden, attention_mask)

  def __call__(self, pixels, tokens, attention_mask, *, train: bool = False,
               keep_fraction: float = 1.0):
    """(image embeddings, text embeddings, logit_scale): the inputs of the contrastive loss."""
    image = self.encode_image(pixels, train=train, keep_fraction=keep_fraction)
    return image, self.encode_text(tokens, attention_mask), self.logit_scale


# The order of the three text batches of a stage-2 step (the reference's order).
STAGE2_MODES = ("itm", "itc", "itg")


@flax.struct.dataclass
class Stage2Output:
  """The inputs of the stage-2 losses (spec 4.2, 9), for an image batch of B rows."""

  itm_logits: jax.Array  # (B, 2) float32: the mean over queries of `itm_head`
  image_features: jax.Array  # (B, embed_dim) normalized: `clip_projector2` of the ITC queries
  backbone_features: jax.Array  # (B, embed_dim) normalized: InternVL-C's, `clip_projector`
  text_features: jax.Array  # (B, embed_dim) normalized: the ITC text at its last real token
  itg_text: jax.Array  # (B, length, width) final-normed QLLaMA states at the ITG text positions
  # (packed captions: (R, P, width), a row per R x K images)
  lm_logits: jax.Array | None  # (B, length, vocab) float32 of `itg_text`; None when not asked for
  logit_scale: jax.Array  # () the log scale


class InternVLG(_DualEncoder):
  """InternVL-G (spec 3.3, 4.2): InternVL-C's parts with QLLaMA as the text tower, plus
  `clip_projector2` on QLLaMA's query outputs and the ITM head."""

  def setup(self):
    super().setup()
    cfg = self.config
    self.qllama = QLlama(cfg.qllama)
    self.clip_projector2 = AttentionPooling(cfg.attn_pool_heads, cfg.embed_dim, cfg.attn_pool_eps,
                                            cfg.text.compute_dtype, cfg.text.attention)
    self.itm_head = layers.dense(2, ("embed", None), dtype=cfg.text.compute_dtype)

  def encode_image(self, pixels, *, mode: str = "G") -> jax.Array:
    """mode "C": InternVL-C's embedding; "G": the normalized sum with the pooled query outputs."""
    if mode not in ("C", "G"):
      raise ValueError(f"encode_image mode must be 'C' or 'G', got {mode!r}.")
    tokens = self.vision_model(pixels).last_hidden_state
    image = l2_normalize(self.clip_projector(tokens))
    if mode == "C":
      return image
    queries = self.qllama(None, None, tokens, mode="image").queries
    return l2_normalize(image + l2_normalize(self.clip_projector2(queries)))

  def encode_text(self, tokens, attention_mask) -> jax.Array:
    hidden = self.qllama(tokens, attention_mask, None, mode="text").text
    return self.project_text(hidden, attention_mask)

  def text_batches(self, pixels, tokens, attention_mask, modes: tuple[str, ...], *,
                   train: bool = False):
    """(InternViT's last tokens, query outputs, text outputs) of text batches `tokens`
    (len(modes), B, length), each under its mode's mask, in one QLLaMA pass against the image
    batch; outputs keep the (len(modes), B) leading axes."""
    count, batch, length = tokens.shape
    vision = self.vision_model(pixels, train=train).last_hidden_state
    out = self.qllama(tokens.reshape(-1, length), attention_mask.reshape(-1, length), vision,
                      mode=modes)
    unflatten = lambda x: x.reshape((count, batch) + x.shape[1:])
    return vision, unflatten(out.queries), unflatten(out.text)

  def __call__(self, pixels, tokens, attention_mask, *, train: bool = False,
               return_logits: bool = True, packed_itg: tuple[jax.Array, jax.Array] | None = None
               ) -> Stage2Output:
    """The stage-2 forward: `tokens` and `attention_mask` are (3, B, length), the ITM, ITC and ITG
    text batches in `STAGE2_MODES` order, each right-padded to the same length.

    ITM rows are the negative captions for the first B - B // 2 images and the positive ones for
    the rest; ITC rows "summarize:" + caption; ITG rows "English caption:" + caption. All 3B rows
    go through QLLaMA in one pass, each batch under its own mask, against the same image tokens.
    Without `return_logits` the ITG loss projects `itg_text` itself (`llama.head_kernel`).

    With `packed_itg` = (tokens, slots), each (R, P) with B = R x K, the ITG captions come packed
    K images to a row instead (`QLlama`'s packed "itg" rows; image r x K + k is slot k + 1 of row
    r), and `tokens` holds only the ITM and ITC batches: they run in one pass, the packed rows in
    a second, and `itg_text` is (R, P, width).
    """
    modes = STAGE2_MODES if packed_itg is None else STAGE2_MODES[:2]
    if tokens.ndim != 3 or tokens.shape[0] != len(modes):
      raise ValueError(f"stage-2 tokens must be ({len(modes)}, batch, length) for {modes}; got "
                       f"shape {tokens.shape}.")
    if attention_mask.shape != tokens.shape:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, tokens {tokens.shape}.")
    vision, queries, text = self.text_batches(pixels, tokens, attention_mask, modes, train=train)
    if packed_itg is None:
      itg_text = text[2]
    else:
      itg_tokens, itg_slots = packed_itg
      rows = itg_tokens.shape[0]
      if vision.shape[0] % rows:
        raise ValueError(f"{vision.shape[0]} images do not make {rows} packed ITG rows.")
      slotted = vision.reshape((rows, -1) + vision.shape[1:])
      itg_text = self.qllama(itg_tokens, itg_slots, slotted, mode="itg").text
    return Stage2Output(
        itm_logits=jnp.mean(self.itm_head(queries[0]).astype(jnp.float32), axis=1),
        image_features=l2_normalize(self.clip_projector2(queries[1])),
        backbone_features=l2_normalize(self.clip_projector(vision)),
        text_features=self.project_text(text[1], attention_mask[1]),
        itg_text=itg_text,
        lm_logits=self.qllama.logits(itg_text) if return_logits else None,
        logit_scale=self.logit_scale)


def init_variables(config: InternVLConfig, rng: jax.Array) -> dict:
  """Freshly initialized variables of InternVL-C or -G (`config.variant`), boxed with their
  logical axis names (what a sharded init needs)."""
  size = config.vision.image_size
  pixels = jnp.zeros((1, size, size, config.vision.num_channels), jnp.float32)
  tokens = jnp.ones((1, 2), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  if config.variant == "C":
    return InternVLC(config).init(rng, pixels, tokens, mask)
  stage2 = lambda model, p, t: model(p, jnp.stack([t] * 3), jnp.stack([mask] * 3))
  return InternVLG(config).init(rng, pixels, tokens, method=stage2)


def abstract_params(config: InternVLConfig) -> dict:
  """Param shapes and dtypes of InternVL-C or -G, with nothing allocated."""
  variables = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
  return nn.meta.unbox(variables["params"])


def init_params(config: InternVLConfig, seed: int = 0) -> dict:
  variables = jax.jit(lambda key: init_variables(config, key))(jax.random.key(seed))
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
