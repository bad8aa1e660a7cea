"""InternViT: the InternVL vision encoder (spec section 1).

Patch embedding (conv with bias) -> CLS token -> learned absolute position embedding (bicubically
resized to the input grid, CLS row untouched) -> optional FLIP token masking -> pre-norm blocks
with LayerScale and stochastic depth, scanned or unrolled (`scan_layers`). There is no final norm.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import VisionConfig
from internvl_jax.models import layers, remat
from internvl_jax.models.interpolate import resize_pos_embed

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


@flax.struct.dataclass
class VisionOutput:
  last_hidden_state: jax.Array  # (batch, tokens, width), the last block's output
  # (num_layers + 1, batch, tokens, width): the embeddings, then every block's output, as the
  # reference's `hidden_states` tuple. Only computed when asked for.
  hidden_states: jax.Array | None = None


def check_pixels(pixels: jax.Array, config: VisionConfig):
  """Fails with a message that says what is wrong with an input batch (shapes are static)."""
  if pixels.ndim != 4:
    raise ValueError(f"pixels must be (batch, height, width, channels); got shape {pixels.shape}.")
  _, height, width, channels = pixels.shape
  if channels != config.num_channels:
    hint = " (pixels are NHWC, not NCHW)" if pixels.shape[1] == config.num_channels else ""
    raise ValueError(
        f"pixels have {channels} channels, the model expects {config.num_channels}{hint}; "
        f"shape {pixels.shape}.")
  if height % config.patch_size or width % config.patch_size:
    raise ValueError(
        f"image size {height}x{width} is not a multiple of the patch size {config.patch_size}.")


def drop_path_rates(config: VisionConfig) -> np.ndarray:
  if config.drop_path_schedule == "uniform":
    return np.full((config.num_layers,), config.drop_path_rate, np.float32)
  return np.linspace(0.0, config.drop_path_rate, config.num_layers, dtype=np.float32)


def random_token_subset(tokens: jax.Array, keep_fraction: float, rng: jax.Array) -> jax.Array:
  """FLIP masking: keeps a random `keep_fraction` of the patch tokens per sample, and the CLS."""
  cls_token, patches = tokens[:, :1], tokens[:, 1:]
  batch, num_patches = patches.shape[:2]
  num_keep = max(1, int(round(num_patches * keep_fraction)))
  noise = jax.random.uniform(rng, (batch, num_patches))
  keep = jnp.sort(jnp.argsort(noise, axis=1)[:, :num_keep], axis=1)
  patches = jnp.take_along_axis(patches, keep[:, :, None], axis=1)
  return jnp.concatenate([cls_token, patches], axis=1)


class Embeddings(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    patches = nn.Conv(
        cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
        padding="VALID", dtype=cfg.compute_dtype, name="patch_embed",
        kernel_init=layers.logical_param(layers.default_kernel_init, (None, None, None, "embed")),
        bias_init=layers.logical_param(nn.initializers.zeros, ("embed",)))(pixels)
    batch, grid_h, grid_w, width = patches.shape
    cls_token = self.param(
        "cls_token", layers.logical_param(layers.default_kernel_init, (None, None, "embed")),
        (1, 1, width))
    pos_embed = self.param(
        "pos_embed", layers.logical_param(layers.default_kernel_init, (None, None, "embed")),
        (1, cfg.num_positions, width))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls_token.astype(patches.dtype), (batch, 1, width)),
         patches.reshape(batch, grid_h * grid_w, width)], axis=1)
    pos_embed = resize_pos_embed(pos_embed, (grid_h, grid_w))
    return tokens + pos_embed.astype(tokens.dtype)


class Block(nn.Module):
  """x += drop_path(ls1 * attn(norm1(x))); x += drop_path(ls2 * mlp(norm2(x)))."""

  config: VisionConfig
  train: bool = False
  return_hidden_states: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array):
    cfg, dtype = self.config, self.config.compute_dtype
    ls_init = layers.logical_param(nn.initializers.constant(cfg.layerscale_init), ("norm",))
    ls1 = self.param("ls1", ls_init, (cfg.hidden_size,))
    ls2 = self.param("ls2", ls_init, (cfg.hidden_size,))

    def residual(x, branch, gamma):
      branch = branch * gamma.astype(branch.dtype)
      if self.train and cfg.drop_path_rate > 0:
        branch = layers.drop_path(branch, drop_rate, self.make_rng("dropout"))
      return layers.constrain(x + branch, ACTIVATION)

    h = layers.make_norm(cfg.norm_type, cfg.norm_eps, dtype, "norm1")(x)
    h = layers.SelfAttention(
        cfg.num_heads, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps, dtype,
        attention_config=cfg.attention, name="attn")(h)
    x = residual(x, h, ls1)
    h = layers.make_norm(cfg.norm_type, cfg.norm_eps, dtype, "norm2")(x)
    x = residual(x, layers.Mlp(cfg.mlp_dim, dtype, name="mlp")(h), ls2)
    return x, (x if self.return_hidden_states else None)


class InternViT(nn.Module):
  """Maps NHWC pixels (ImageNet-normalized) to per-token features."""

  config: VisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, *, train: bool = False, keep_fraction: float = 1.0,
               return_hidden_states: bool = False) -> VisionOutput:
    """`keep_fraction` < 1 drops patch tokens at random (FLIP); it applies in training only."""
    cfg = self.config
    check_pixels(pixels, cfg)
    if not 0.0 < keep_fraction <= 1.0:
      raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
    x = layers.constrain(Embeddings(cfg, name="embeddings")(pixels), ACTIVATION)
    if train and keep_fraction < 1.0:
      x = random_token_subset(x, keep_fraction, self.make_rng("masking"))
    embeddings = x

    block = remat.remat(Block, cfg.remat_policy)
    rates = jnp.asarray(drop_path_rates(cfg))
    if cfg.scan_layers or self.is_initializing():  # params are stacked either way
      blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=0, length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, block_outputs = blocks(cfg, train, return_hidden_states, name="blocks")(x, rates)
    else:
      x, block_outputs = self._unrolled_blocks(
          block(cfg, train, return_hidden_states, parent=None), x, rates)
    hidden_states = None
    if return_hidden_states:
      hidden_states = jnp.concatenate([embeddings[None], block_outputs], axis=0)
    return VisionOutput(last_hidden_state=x, hidden_states=hidden_states)

  def _unrolled_blocks(self, block: nn.Module, x: jax.Array, rates: jax.Array):
    """The scan's blocks as a Python loop over its stacked params (`scan_layers=False`).

    The params are split rather than indexed, so their gradient is one concatenation of the
    layers' gradients; drop path draws one key per layer from the "dropout" stream.
    """
    num_layers = self.config.num_layers
    leaves, treedef = jax.tree.flatten(nn.meta.unbox(self.variables["params"]["blocks"]))
    layer_leaves = [jnp.split(leaf, num_layers) for leaf in leaves]
    uses_rng = block.train and self.config.drop_path_rate > 0
    keys = jax.random.split(self.make_rng("dropout"), num_layers) if uses_rng else None
    outputs = []
    for i in range(num_layers):
      params = treedef.unflatten([parts[i][0] for parts in layer_leaves])
      rngs = {"dropout": keys[i]} if uses_rng else None
      x, output = block.apply({"params": params}, x, rates[i], rngs=rngs)
      outputs.append(output)
    return x, (jnp.stack(outputs) if block.return_hidden_states else None)


def select_layer(output: VisionOutput, layer: int) -> jax.Array:
  """The reference's `hidden_states[layer]`: -1 is the last block, -4 the fourth-to-last, 0 the embeddings."""
  if layer == -1:
    return output.last_hidden_state
  if output.hidden_states is None:
    raise ValueError(f"layer={layer} needs the model called with return_hidden_states=True.")
  num_states = output.hidden_states.shape[0]
  if not -num_states <= layer < num_states:
    raise ValueError(f"layer={layer} is out of range for {num_states} hidden states.")
  return output.hidden_states[layer]


def abstract_params(config: VisionConfig) -> dict:
  """Param shapes and dtypes of the model, with nothing allocated."""
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                jnp.float32)
  variables = jax.eval_shape(lambda x: InternViT(config).init(jax.random.key(0), x), pixels)
  return nn.meta.unbox(variables["params"])


def init_params(config: VisionConfig, seed: int = 0) -> dict:
  """Freshly initialized params, as numpy arrays."""
  pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
  variables = jax.jit(InternViT(config).init)(jax.random.key(seed), pixels)
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
