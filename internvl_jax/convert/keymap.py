"""Declarative key maps between the Flax param tree and PyTorch state dicts.

A layout is a table of `Rule`s. Each rule ties one Flax param (a '/'-joined path into the param
tree, optionally one index of one axis of it) to one PyTorch key, with a `Transform` that turns
Flax data into PyTorch data and back. Consecutive rules with the same key fill consecutive rows
of one fused tensor (Phi-3's `qkv_proj` is the q, k and v kernels one after the other). Params of
scanned blocks carry a leading layer axis; their PyTorch keys contain `{layer}` and the rule
applies once per layer. When the scan runs over groups of layers (QLLaMA scans pairs: a layer
with cross-attention, then one without), slice i of a stacked param is PyTorch layer
`layer_stride * i + layer_offset`.

Conversion moves data in blocks of at most ~4 MiB: a block is a range of rows (axis 0) of one
PyTorch tensor and the box of the Flax array that holds the same numbers. Both directions and
every storage (numpy arrays, safetensors files, Orbax checkpoints) go through the same plan, so
converting never holds more than a block or two, whatever the size of the checkpoint.
"""

import dataclasses
import itertools
import re
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

BLOCK_BYTES = 4 * 2**20

Index = tuple  # of ints and slices, into a full Flax array


class ConversionError(ValueError):
  """A checkpoint does not fit the layout or the model: the message names what and where."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """Base: the tensor moves as one block. Subclasses say how a Flax array maps to PyTorch."""

  def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_shape)

  def row_blocks(self, flax_shape, itemsize: int, target_bytes: int) -> Iterator[tuple[slice, Index]]:
    """(PyTorch rows, the same data's index into the Flax array), covering the tensor in order."""
    yield slice(None), ()

  def to_torch(self, flax_block: np.ndarray) -> np.ndarray:
    return flax_block

  def from_torch(self, torch_rows: np.ndarray, flax_block_shape) -> np.ndarray:
    return torch_rows.reshape(flax_block_shape)


def _row_ranges(num_rows: int, row_bytes: int, target_bytes: int) -> Iterator[slice]:
  step = max(1, target_bytes // max(1, row_bytes))
  for start in range(0, num_rows, step):
    yield slice(start, min(start + step, num_rows))


@dataclasses.dataclass(frozen=True)
class Same(Transform):
  """The PyTorch tensor has the Flax array's layout; blocks are ranges of rows."""

  def row_blocks(self, flax_shape, itemsize, target_bytes):
    if not flax_shape:
      yield slice(None), ()
      return
    row_bytes = itemsize * int(np.prod(flax_shape[1:]))
    for rows in _row_ranges(flax_shape[0], row_bytes, target_bytes):
      yield rows, (rows,)


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
  """A small bias or norm weight whose Flax array splits the feature axis, e.g. (3, heads, head_dim)."""

  def torch_shape(self, flax_shape):
    return (int(np.prod(flax_shape)),)

  def to_torch(self, flax_block):
    return flax_block.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """A Dense kernel (in..., out...) <-> a torch Linear weight [out, in]; `in_ndim` input axes.

  PyTorch row r is the flattened output index; a block is a range of the last output axis at
  fixed leading output indices, i.e. a box of the kernel.
  """

  in_ndim: int = 1

  def torch_shape(self, flax_shape):
    fan_in, fan_out = int(np.prod(flax_shape[:self.in_ndim])), int(np.prod(flax_shape[self.in_ndim:]))
    return (fan_out, fan_in)

  def row_blocks(self, flax_shape, itemsize, target_bytes):
    in_dims, out_dims = flax_shape[:self.in_ndim], flax_shape[self.in_ndim:]
    row_bytes = itemsize * int(np.prod(in_dims))
    whole_inputs = (slice(None),) * self.in_ndim
    for outer in itertools.product(*map(range, out_dims[:-1])):
      first_row = int(np.ravel_multi_index(outer, out_dims[:-1])) * out_dims[-1] if outer else 0
      for rows in _row_ranges(out_dims[-1], row_bytes, target_bytes):
        yield (slice(first_row + rows.start, first_row + rows.stop), whole_inputs + outer + (rows,))

  def to_torch(self, flax_block):
    fan_in = int(np.prod(flax_block.shape[:self.in_ndim]))
    return flax_block.reshape(fan_in, -1).T

  def from_torch(self, torch_rows, flax_block_shape):
    return torch_rows.T.reshape(flax_block_shape)


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
  """A Flax Conv kernel (kh, kw, in, out) <-> a torch Conv2d weight [out, in, kh, kw]."""

  def torch_shape(self, flax_shape):
    kh, kw, fan_in, fan_out = flax_shape
    return (fan_out, fan_in, kh, kw)

  def to_torch(self, flax_block):
    return flax_block.transpose(3, 2, 0, 1)

  def from_torch(self, torch_rows, flax_block_shape):
    return torch_rows.transpose(2, 3, 1, 0).reshape(flax_block_shape)


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # '/'-joined path in the param tree
  torch: str  # the PyTorch key; contains '{layer}' for the params of scanned blocks
  transform: Transform = Same()
  # (axis, index) into the per-layer Flax array, when one Flax array feeds several torch
  # tensors, e.g. the fused qkv kernel and transformers' separate q/k/v projections. A slice
  # keeps the axis: InternLM2's `wqkv` takes the query heads of one key/value group at a time.
  part: tuple[int, int | slice] | None = None
  layer_stride: int = 1  # slice i of a stacked param is PyTorch layer stride * i + offset
  layer_offset: int = 0

  @property
  def stacked(self) -> bool:
    return "{layer}" in self.torch

  def torch_key(self, index: int) -> str:
    return self.torch.format(layer=self.layer_stride * index + self.layer_offset)


def prefixed(rules, flax_prefix: str, torch_prefix: str) -> tuple[Rule, ...]:
  """The rules of a sub-model that sits under `flax_prefix` / `torch_prefix` in a larger one."""
  return tuple(dataclasses.replace(rule, flax=flax_prefix + rule.flax, torch=torch_prefix + rule.torch)
               for rule in rules)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch checkpoint format names and lays out the params of one Flax model."""

  name: str
  rules: tuple[Rule, ...]
  # Regexes of keys a checkpoint may hold that carry no params (e.g. rotary-embedding buffers).
  ignored: tuple[str, ...] = ()

  def is_ignored(self, key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in self.ignored)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """One PyTorch tensor, or the rows of a fused one that one Flax leaf fills: its key, the whole
  tensor's shape, and blocks of (rows of the whole tensor, index into the Flax leaf)."""

  key: str
  flax: str
  transform: Transform
  torch_shape: tuple[int, ...]
  blocks: tuple[tuple[slice, Index], ...]


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


def index_shape(shape: tuple[int, ...], index: Index) -> tuple[int, ...]:
  """The shape of array[index] for an index of ints and slices."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(len(range(*i.indices(n))) for i, n in zip(index, shape) if isinstance(i, slice))


def plan(layout: Layout, abstract_params: Mapping, target_bytes: int = BLOCK_BYTES) -> list[TensorPlan]:
  """Every PyTorch tensor of this model in the layout, in rule order, split into blocks."""
  flat = flatten(abstract_params)
  plans = []
  for rule in layout.rules:
    if rule.flax not in flat:  # optional params, e.g. biases the config turns off
      continue
    leaf_shape, itemsize = tuple(flat[rule.flax].shape), np.dtype(flat[rule.flax].dtype).itemsize
    layer_shape = leaf_shape[1:] if rule.stacked else leaf_shape
    tensor_shape = layer_shape
    if rule.part is not None:
      axis, part = rule.part
      kept = (len(range(*part.indices(layer_shape[axis]))),) if isinstance(part, slice) else ()
      tensor_shape = layer_shape[:axis] + kept + layer_shape[axis + 1:]
    for layer in range(leaf_shape[0] if rule.stacked else 1):
      blocks = []
      for rows, index in rule.transform.row_blocks(tensor_shape, itemsize, target_bytes):
        index = tuple(index) + (slice(None),) * (len(tensor_shape) - len(index))
        if rule.part is not None:
          index = _into_part(index, tensor_shape, *rule.part)
        blocks.append((rows, ((layer,) if rule.stacked else ()) + index))
      plans.append(TensorPlan(rule.torch_key(layer), rule.flax, rule.transform,
                              rule.transform.torch_shape(tensor_shape), tuple(blocks)))
  return _fuse(plans)


def _into_part(index: Index, part_shape, axis: int, part: int | slice) -> Index:
  """An index into a part of a per-layer array as an index into the whole array."""
  if not isinstance(part, slice):
    return index[:axis] + (part,) + index[axis:]
  start, inner = part.start or 0, index[axis]
  if isinstance(inner, slice):
    first, last, _ = inner.indices(part_shape[axis])
    inner = slice(start + first, start + last)
  else:
    inner = start + inner
  return index[:axis] + (inner,) + index[axis + 1:]


def _fuse(plans: list[TensorPlan]) -> list[TensorPlan]:
  """The plans of one key together, in rule order, stacked along the rows: each block's rows
  offset by the parts before it, and every part given the whole tensor's shape."""
  by_key: dict[str, list[TensorPlan]] = {}
  for tensor in plans:
    by_key.setdefault(tensor.key, []).append(tensor)
  fused = []
  for parts in by_key.values():
    if len(parts) == 1:
      fused.extend(parts)
      continue
    if len({part.torch_shape[1:] for part in parts}) > 1:
      raise ConversionError(f"{parts[0].key}: fused parts of shapes "
                            f"{[part.torch_shape for part in parts]} differ beyond their rows.")
    shape, offset = (sum(part.torch_shape[0] for part in parts),) + parts[0].torch_shape[1:], 0
    for part in parts:
      ranges = ((rows.indices(part.torch_shape[0]), index) for rows, index in part.blocks)
      blocks = tuple((slice(offset + first, offset + last), index)
                     for (first, last, _), index in ranges)
      fused.append(dataclasses.replace(part, torch_shape=shape, blocks=blocks))
      offset += part.torch_shape[0]
  return fused


def chunk_shapes(plans: list[TensorPlan], abstract_params: Mapping) -> dict[str, tuple[int, ...]]:
  """Per Flax leaf, the shape of its first block with every axis kept: a storage chunk shape
  such that each block of the plan is exactly one chunk."""
  flat = flatten(abstract_params)
  chunks = {}
  for tensor in plans:
    if tensor.flax in chunks:
      continue
    shape = flat[tensor.flax].shape
    index = tensor.blocks[0][1] + (slice(None),) * (len(shape) - len(tensor.blocks[0][1]))
    chunks[tensor.flax] = tuple(1 if isinstance(i, int) else len(range(*i.indices(n)))
                                for i, n in zip(index, shape))
  return chunks


def export_tensors(plans: list[TensorPlan], read_flax: Callable[[str, Index], np.ndarray]
                   ) -> Iterator[tuple[TensorPlan, Iterator[np.ndarray]]]:
  """Per PyTorch tensor, its rows block by block, read from the Flax side with `read_flax`
  (the parts of a fused tensor one after the other)."""
  for _, parts in itertools.groupby(plans, key=lambda tensor: tensor.key):
    parts = list(parts)
    yield parts[0], (part.transform.to_torch(np.asarray(read_flax(part.flax, index)))
                     for part in parts for _, index in part.blocks)


def check_source(layout: Layout, plans: list[TensorPlan], keys: set[str], shape_of, dtype_of, *,
                 allow_missing: bool) -> list[TensorPlan]:
  """Checks a checkpoint's keys, shapes and dtypes against the plan before anything is read.

  Returns the plans of missing tensors (only when `allow_missing`); anything else that does not
  fit raises a ConversionError that names the keys.
  """
  expected = {tensor.key: tensor for tensor in plans}
  unexpected = sorted(k for k in keys if k not in expected and not layout.is_ignored(k))
  missing = [tensor for tensor in plans if tensor.key not in keys]
  if unexpected:
    raise ConversionError(f"{layout.name}: unexpected keys in the checkpoint: {_some(unexpected)}")
  if missing and not allow_missing:
    raise ConversionError(f"{layout.name}: missing keys: {_some([t.key for t in missing])} "
                          "(allow missing keys to initialize them randomly instead).")
  for tensor in plans:
    if tensor.key not in keys:
      continue
    dtype, shape = dtype_of(tensor.key), tuple(shape_of(tensor.key))
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ConversionError(f"{tensor.key}: dtype {np.dtype(dtype)} is not a floating-point dtype.")
    if shape != tensor.torch_shape:
      raise ConversionError(f"{tensor.key}: shape {shape} does not match the model's {tensor.torch_shape}.")
  return missing


def import_tensors(plans: list[TensorPlan], read_torch: Callable[[str, slice], np.ndarray],
                   abstract_params: Mapping) -> Iterator[tuple[str, Index, np.ndarray]]:
  """(Flax path, index, block) for every block of the given (checked) tensors, in plan order."""
  flat = flatten(abstract_params)
  for tensor in plans:
    leaf = flat[tensor.flax]
    for rows, index in tensor.blocks:
      block = tensor.transform.from_torch(read_torch(tensor.key, rows), index_shape(leaf.shape, index))
      yield tensor.flax, index, np.asarray(block, leaf.dtype)


def _some(keys: list[str], limit: int = 12) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
