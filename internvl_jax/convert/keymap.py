"""Declarative key maps between the Flax param tree and PyTorch state dicts.

A layout is a table of `Rule`s. Each rule ties one Flax param (a '/'-joined path into the param
tree, optionally one index of one axis of it) to one PyTorch key, with a `Transform` that turns
the Flax array into the PyTorch tensor and back. Params of scanned blocks carry a leading layer
axis; their PyTorch keys contain `{layer}` and the rule is applied once per layer slice. Both
directions go one tensor at a time, so memory stays bounded by the largest tensor in flight.
"""

import dataclasses
import re
from typing import Iterator, Mapping

import jax.numpy as jnp
import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not fit the layout or the model: the message names what and where."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """Identity: the PyTorch tensor has the Flax array's layout."""

  def to_torch(self, x: np.ndarray) -> np.ndarray:
    return x

  def from_torch(self, x: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(flax_shape)

  def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
  """A bias or norm weight whose Flax array splits the feature axis, e.g. (3, heads, head_dim)."""

  def to_torch(self, x):
    return x.reshape(-1)

  def torch_shape(self, flax_shape):
    return (int(np.prod(flax_shape)),)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """A Dense kernel (in..., out...) <-> a torch Linear weight [out, in]; `in_ndim` input axes."""

  in_ndim: int = 1

  def _in_out(self, flax_shape):
    return int(np.prod(flax_shape[:self.in_ndim])), int(np.prod(flax_shape[self.in_ndim:]))

  def to_torch(self, x):
    fan_in, fan_out = self._in_out(x.shape)
    return x.reshape(fan_in, fan_out).T

  def from_torch(self, x, flax_shape):
    return x.T.reshape(flax_shape)

  def torch_shape(self, flax_shape):
    return tuple(reversed(self._in_out(flax_shape)))


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
  """A Flax Conv kernel (kh, kw, in, out) <-> a torch Conv2d weight [out, in, kh, kw]."""

  def to_torch(self, x):
    return x.transpose(3, 2, 0, 1)

  def from_torch(self, x, flax_shape):
    return x.transpose(2, 3, 1, 0).reshape(flax_shape)

  def torch_shape(self, flax_shape):
    kh, kw, fan_in, fan_out = flax_shape
    return (fan_out, fan_in, kh, kw)


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # '/'-joined path in the param tree
  torch: str  # the PyTorch key; contains '{layer}' for the params of scanned blocks
  transform: Transform = Transform()
  # (axis, index) into the (per-layer) Flax array, when one Flax array feeds several torch
  # tensors, e.g. the fused qkv kernel and transformers' separate q/k/v projections.
  part: tuple[int, int] | None = None

  @property
  def stacked(self) -> bool:
    return "{layer}" in self.torch


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch checkpoint format names and lays out the params of one Flax model."""

  name: str
  rules: tuple[Rule, ...]
  # Keys a checkpoint may hold that carry no params (e.g. rotary-embedding buffers).
  ignored: tuple[str, ...] = ()

  def rules_for(self, params: Mapping) -> tuple[Rule, ...]:
    """The rules whose Flax param exists in this model (optional parts such as biases)."""
    flat = flatten(params)
    return tuple(rule for rule in self.rules if rule.flax in flat)

  def is_ignored(self, key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in self.ignored)


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for name, value in tree.items():
    path = f"{prefix}{name}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _num_layers(rule: Rule, flax_shape) -> int:
  return flax_shape[0] if rule.stacked else 1


def _slice_shape(rule: Rule, flax_shape) -> tuple[int, ...]:
  shape = tuple(flax_shape[1:] if rule.stacked else flax_shape)
  if rule.part is not None:
    axis, _ = rule.part
    shape = shape[:axis] + shape[axis + 1:]
  return shape


def _index(rule: Rule, layer: int):
  index = (layer,) if rule.stacked else ()
  if rule.part is not None:
    axis, part = rule.part
    index += (slice(None),) * axis + (part,)
  return index


def torch_keys(layout: Layout, abstract_params: Mapping) -> dict[str, tuple[Rule, int]]:
  """Every PyTorch key the layout expects for this model -> (rule, layer)."""
  flat = flatten(abstract_params)
  keys = {}
  for rule in layout.rules_for(abstract_params):
    for layer in range(_num_layers(rule, flat[rule.flax].shape)):
      keys[rule.torch.format(layer=layer)] = (rule, layer)
  return keys


def torch_shapes(layout: Layout, abstract_params: Mapping) -> dict[str, tuple[int, ...]]:
  flat = flatten(abstract_params)
  return {key: rule.transform.torch_shape(_slice_shape(rule, flat[rule.flax].shape))
          for key, (rule, _) in torch_keys(layout, abstract_params).items()}


def to_torch(layout: Layout, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, array) one tensor at a time, in the layout's rule order.

  The arrays may be non-contiguous views (e.g. transposed kernels): writers copy them in chunks.
  """
  flat = flatten(params)
  for key, (rule, layer) in torch_keys(layout, params).items():
    yield key, rule.transform.to_torch(np.asarray(flat[rule.flax][_index(rule, layer)]))


def from_torch(layout: Layout, abstract_params: Mapping, read, keys: set[str], *,
               allow_missing: bool = False, init_params: Mapping | None = None) -> dict:
  """Builds the Flax param tree from PyTorch tensors read one at a time.

  `read(key)` returns one tensor as a numpy array; `keys` are all keys in the checkpoint (prefix
  already removed). Unexpected keys, missing keys (unless `allow_missing`, in which case those
  params keep `init_params`' values) and shape mismatches raise a ConversionError naming them.
  """
  expected = torch_keys(layout, abstract_params)
  unexpected = sorted(k for k in keys if k not in expected and not layout.is_ignored(k))
  missing = sorted(k for k in expected if k not in keys)
  if unexpected:
    raise ConversionError(f"{layout.name}: unexpected keys in the checkpoint: {_some(unexpected)}")
  if missing and not allow_missing:
    raise ConversionError(
        f"{layout.name}: missing keys: {_some(missing)} (pass --allow-missing to initialize them "
        "randomly instead).")
  if missing and init_params is None:
    raise ConversionError(f"{layout.name}: missing keys {_some(missing)} and no init params given.")

  abstract_flat = flatten(abstract_params)
  init_flat = flatten(init_params) if missing else {}
  out = {}
  for key, (rule, layer) in expected.items():
    abstract = abstract_flat[rule.flax]
    if rule.flax not in out:
      out[rule.flax] = (np.array(init_flat[rule.flax], dtype=abstract.dtype) if rule.flax in init_flat
                        else np.empty(abstract.shape, abstract.dtype))
    if key not in keys:
      continue
    tensor = read(key)
    if not jnp.issubdtype(tensor.dtype, jnp.floating):
      raise ConversionError(f"{key}: dtype {tensor.dtype} is not a floating-point dtype.")
    want = rule.transform.torch_shape(_slice_shape(rule, abstract.shape))
    if tuple(tensor.shape) != want:
      raise ConversionError(f"{key}: shape {tuple(tensor.shape)} does not match the model's {want}.")
    out[rule.flax][_index(rule, layer)] = rule.transform.from_torch(
        tensor, _slice_shape(rule, abstract.shape))
  return unflatten(out)


def _some(keys: list[str], limit: int = 12) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
