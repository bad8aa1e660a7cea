"""InternVL-C (spec 3.1-3.2): contrastive image and text embeddings.

Image: InternViT's last-block tokens -> attention pooling (`clip_projector`) -> L2-normalized.
Text: the LLaMA tower's final-normed hidden state at the last real token (the appended EOS)
-> `text_projection` (stored [in, out], used as x @ W) -> L2-normalized.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.models import layers
from internvl_jax.models.intern_vit import InternViT
from internvl_jax.models.llama import Llama


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    norm = lambda name: layers.make_norm("layer_norm", self.eps, self.dtype, name)
    attn = layers.Attention(self.num_heads, width // self.num_heads, self.out_dim, use_bias=True,
                            dtype=self.dtype, name="cross_attn")
    query = norm("norm_q")(jnp.mean(x, axis=1, keepdims=True))
    keys, values = attn.k_proj(norm("norm_k")(x)), attn.v_proj(norm("norm_v")(x))
    return attn.attend(attn.query(query), keys, values)[:, 0]


def last_token_features(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The hidden state at each row's last real token (right padding: mask.sum - 1)."""
  last = jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class InternVLC(nn.Module):
  config: InternVLConfig

  def setup(self):
    cfg = self.config
    self.vision_model = InternViT(cfg.vision)
    self.text_model = Llama(cfg.text)
    self.clip_projector = AttentionPooling(cfg.attn_pool_heads, cfg.embed_dim, cfg.attn_pool_eps,
                                           cfg.vision.compute_dtype)
    self.text_projection = self.param(
        "text_projection", layers.logical_param(layers.default_kernel_init, ("embed", None)),
        (cfg.text.hidden_size, cfg.embed_dim))
    self.logit_scale = self.param(
        "logit_scale", layers.logical_param(nn.initializers.constant(cfg.logit_scale_init), ()), ())

  def encode_image(self, pixels, *, train: bool = False, keep_fraction: float = 1.0) -> jax.Array:
    tokens = self.vision_model(pixels, train=train, keep_fraction=keep_fraction).last_hidden_state
    return l2_normalize(self.clip_projector(tokens))

  def encode_text(self, tokens, attention_mask) -> jax.Array:
    hidden = self.text_model(tokens, attention_mask, return_logits=False).hidden_state
    features = last_token_features(hidden, attention_mask)
    return l2_normalize(features @ self.text_projection.astype(features.dtype))

  def __call__(self, pixels, tokens, attention_mask, *, train: bool = False,
               keep_fraction: float = 1.0):
    """(image embeddings, text embeddings, logit_scale): the inputs of the contrastive loss."""
    image = self.encode_image(pixels, train=train, keep_fraction=keep_fraction)
    return image, self.encode_text(tokens, attention_mask), self.logit_scale


def abstract_params(config: InternVLConfig) -> dict:
  """Param shapes and dtypes, with nothing allocated."""
  size = config.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, config.vision.num_channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  variables = jax.eval_shape(
      lambda p, t: InternVLC(config).init(jax.random.key(0), p, t, jnp.ones(t.shape, bool)),
      pixels, tokens)
  return nn.meta.unbox(variables["params"])


def init_params(config: InternVLConfig, seed: int = 0) -> dict:
  size = config.vision.image_size
  pixels = jnp.zeros((1, size, size, config.vision.num_channels))
  tokens = jnp.ones((1, 2), jnp.int32)
  variables = jax.jit(InternVLC(config).init)(jax.random.key(seed), pixels, tokens, jnp.ones((1, 2), bool))
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
