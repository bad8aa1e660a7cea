"""The optimizer from a plain config: AdamW, warmup + cosine, per-group peak learning rates,
layer-wise learning-rate decay, a weight-decay mask and a trainable mask.

Params are selected by regexes (`re.search`) on their '/'-joined paths ("blocks/attn/qkv/kernel").
Frozen params hold no optimizer state; `partition` lets a train step take gradients w.r.t. the
trainable params only:

  trainable, frozen = partition(params, trainable_mask(config, params))
  grads = jax.grad(lambda t: loss_fn(merge(t, frozen), batch))(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  params = merge(optax.apply_updates(trainable, updates), frozen)

`tx` (from `make_optimizer`) works on the full tree too (frozen updates are zero), but the
partitioned step does no work at all for frozen params.

A scanned stack holds every layer in one array, so training some of its layers (the official
`unfreeze_vit_layers`) cannot leave the others out of the state: `trainable_layers` makes the
mask of such a leaf a boolean vector over its leading axis; the leaf keeps its optimizer state,
and the frozen layers' gradients and updates (weight decay included) are zero.
"""

import dataclasses
import re

import jax
import numpy as np
import optax

# The reference decays neither biases, norm scales, LayerScale, nor the learned embeddings and
# temperature that are not matmul weights.
NO_WEIGHT_DECAY = (r"bias$", r"(^|/)scale$", r"(^|/)ls[12]$", r"(^|/)pos_embed$",
                   r"(^|/)cls_token$", r"(^|/)query_tokens$", r"(^|/)logit_scale$")


def path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _matches(patterns, name: str) -> bool:
  return any(re.search(p, name) for p in patterns)


def _map_named(fn, tree):
  """tree_map over (name, leaf); MaskedNode holes (see `partition`) stay holes."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_name(path), leaf), tree)


@dataclasses.dataclass(frozen=True)
class LayerDecay:
  """Layer-wise lr decay over one tower, as the reference's fine-tuning does (spec 4.3).

  With L = depth + 2: params matching `first` have layer id 0, layer i of the scanned stack
  matching `blocks` has id i + 1, any other param of the tower id L; the lr scale is
  rate ** (L - id - 1), capped at 1. A stack that scans `layers_per_block` layers per slice
  (QLLaMA's pairs) names the layer within the slice by the `offset` group of `blocks`: slice j,
  offset k is layer j * layers_per_block + k.
  """

  rate: float
  depth: int
  prefix: str = ""  # regex selecting the tower's params; "" is every param
  first: str = r"(^|/)embeddings/"
  blocks: str = r"(^|/)blocks/"
  layers_per_block: int = 1

  def __post_init__(self):
    if self.layers_per_block < 1 or self.depth % self.layers_per_block:
      raise ValueError(f"LayerDecay: layers_per_block {self.layers_per_block} must be positive and "
                       f"divide depth {self.depth}.")
    if self.layers_per_block > 1 and "offset" not in re.compile(self.blocks).groupindex:
      raise ValueError(f"LayerDecay: blocks {self.blocks!r} needs an (?P<offset>...) group naming "
                       f"the layer within a slice of {self.layers_per_block}.")

  def scale(self, name: str, shape: tuple[int, ...]) -> float | np.ndarray:
    num_ids = self.depth + 2
    if re.search(self.first, name):
      return min(1.0, self.rate**(num_ids - 1))
    match = re.search(self.blocks, name)
    if match:
      slices = self.depth // self.layers_per_block
      if not shape or shape[0] != slices:
        raise ValueError(
            f"LayerDecay: {name} {shape} should be stacked over depth {self.depth} blocks "
            f"({slices} slices of {self.layers_per_block}) on its leading axis.")
      offset = int(match.group("offset")) if self.layers_per_block > 1 else 0
      if not 0 <= offset < self.layers_per_block:
        raise ValueError(f"LayerDecay: {name} is layer {offset} of a slice of "
                         f"{self.layers_per_block}.")
      ids = np.arange(slices) * self.layers_per_block + offset + 1
      scales = np.minimum(1.0, self.rate**(num_ids - ids - 1.0)).astype(np.float32)
      return scales.reshape((-1,) + (1,) * (len(shape) - 1))
    return 1.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with decoupled weight decay scaled by the lr (torch.optim.AdamW), warmup + cosine."""

  learning_rate: float = 1e-3  # peak lr of params in no group
  lr_groups: tuple[tuple[str, str, float], ...] = ()  # (name, path regex, peak lr); first wins
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY
  grad_clip_norm: float | None = None  # global norm over the trainable params
  warmup_steps: int = 0  # linear from 0 to the peak
  total_steps: int = 1000  # warmup included; cosine from the peak to peak * end_lr_ratio
  end_lr_ratio: float = 0.0
  layer_decay: tuple[LayerDecay, ...] = ()  # the first whose prefix matches applies
  trainable: tuple[str, ...] = ("",)  # a param trains if it matches one of these ...
  frozen: tuple[str, ...] = ()  # ... and none of these
  # (regex, start): the layers [start:] (a Python slice of the leading axis) of the scanned
  # params matching the regex train, whatever `trainable` and `frozen` say of the others.
  trainable_layers: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(
          f"OptimizerConfig: need 0 <= warmup_steps < total_steps, got {self.warmup_steps} "
          f"and {self.total_steps}.")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(f"OptimizerConfig: end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}.")
    if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
      raise ValueError(f"OptimizerConfig: betas must be in [0, 1), got {(self.b1, self.b2)}.")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"OptimizerConfig: grad_clip_norm must be positive or None, got "
                       f"{self.grad_clip_norm}.")
    names = [name for name, _, _ in self.lr_groups]
    if len(set(names)) != len(names) or "default" in names:
      raise ValueError(
          f"OptimizerConfig: lr group names must be unique and not 'default': {names}.")

  def replace(self, **changes) -> "OptimizerConfig":
    return dataclasses.replace(self, **changes)

  def peak_lr(self, name: str) -> float:
    return next((lr for _, pattern, lr in self.lr_groups if re.search(pattern, name)),
                self.learning_rate)

  def is_trainable(self, name: str) -> bool:
    """Whether the whole param trains (a param with some trainable layers is not)."""
    return _matches(self.trainable, name) and not _matches(self.frozen, name)

  def layer_mask(self, name: str, shape: tuple[int, ...]) -> bool | np.ndarray:
    """True / False for the whole param, or a bool vector over a scanned stack's layers."""
    whole = self.is_trainable(name)
    start = next((s for pattern, s in self.trainable_layers if re.search(pattern, name)), None)
    if whole or start is None:
      return whole
    if not shape:
      raise ValueError(f"OptimizerConfig.trainable_layers: {name} is a scalar, not a stack of "
                       "layers.")
    layers = np.zeros(shape[0], bool)
    layers[start:] = True
    return layers if not layers.all() else True


def schedule(config: OptimizerConfig):
  """Step -> fraction of the peak lr: linear warmup from 0, then cosine to `end_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.end_lr_ratio)


def learning_rates(config: OptimizerConfig, step) -> dict[str, jax.Array]:
  """The current lr of each group ("default" for params in none), before layer decay; to log."""
  fraction = schedule(config)(step)
  rates = {"default": config.learning_rate * fraction}
  rates.update((name, lr * fraction) for name, _, lr in config.lr_groups)
  return rates


def trainable_mask(config: OptimizerConfig, params):
  """Per param: True, False or a bool vector over its leading (layer) axis (`layer_mask`)."""
  return _map_named(lambda name, leaf: config.layer_mask(name, np.shape(leaf)), params)


def _trains(mask) -> bool:
  return bool(np.any(mask))


def _layer_scale(mask, ndim: int) -> np.ndarray:
  """The mask as a float32 multiplier broadcasting over a param of rank `ndim`."""
  return np.asarray(mask, np.float32).reshape(np.shape(mask) + (1,) * (ndim - np.ndim(mask)))


def weight_decay_mask(config: OptimizerConfig, params):
  return _map_named(lambda name, _: not _matches(config.no_weight_decay, name), params)


def lr_multipliers(config: OptimizerConfig, params):
  """Per-param peak lr times its layer-decay scale (an array over a scanned stack's slices)."""
  def multiplier(name, leaf):
    decay = next((d for d in config.layer_decay if re.search(d.prefix, name)), None)
    scale = 1.0 if decay is None else decay.scale(name, np.shape(leaf))
    # Zero on frozen layers, so that weight decay does not move them either.
    layers = _layer_scale(config.layer_mask(name, np.shape(leaf)), np.ndim(leaf))
    return np.float32(config.peak_lr(name)) * np.asarray(scale, np.float32) * layers

  return _map_named(multiplier, params)


def _scale_by_lr_multipliers(config: OptimizerConfig) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    scaled = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates,
                          lr_multipliers(config, updates))
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _zero_frozen_layers(config: OptimizerConfig) -> optax.GradientTransformation:
  """Zeroes the gradients of frozen layers, before clipping counts them in the norm."""
  def update(updates, state, params=None):
    del params
    masked = _map_named(
        lambda name, u: u * _layer_scale(config.layer_mask(name, u.shape), u.ndim).astype(u.dtype),
        updates)
    return masked, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The AdamW transformation; `update` needs the params (for weight decay).

  Frozen params go to `set_to_zero`, so the Adam moments exist for trainable params only.
  """
  clip = (optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm
          else optax.identity())
  step_fraction = schedule(config)
  adamw = optax.chain(
      _zero_frozen_layers(config),
      clip,
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay,
                                mask=lambda params: weight_decay_mask(config, params)),
      _scale_by_lr_multipliers(config),
      optax.scale_by_schedule(lambda step: -step_fraction(step)))

  def labels(params):
    return jax.tree.map(lambda m: "trainable" if _trains(m) else "frozen",
                        trainable_mask(config, params))

  return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)


def partition(params, mask):
  """(trainable, frozen): two trees shaped like `params`, each with `optax.MaskedNode()` holes
  where the other holds the leaf. Holes are empty pytrees: grads and optimizer state skip them."""
  hole = optax.MaskedNode()
  trainable = jax.tree.map(lambda p, m: p if _trains(m) else hole, params, mask)
  frozen = jax.tree.map(lambda p, m: hole if _trains(m) else p, params, mask)
  return trainable, frozen


def merge(trainable, frozen):
  """The inverse of `partition`."""
  is_hole = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(lambda t, f: f if is_hole(t) else t, trainable, frozen, is_leaf=is_hole)
