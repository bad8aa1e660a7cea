"""Orbax checkpoints written and read block by block, so converting a 6B model needs ~no memory.

Writing: a leaf can be a `BlockSource` (shape, dtype, chunk shape, and a generator of
(index, block) pairs, each block exactly one storage chunk). A type handler registered for it
lets Orbax do everything it normally does (temporary directory, metadata, commit) while the array
data goes to TensorStore one block at a time. The leaf is recorded as a plain numpy array, so the
checkpoint restores with Orbax's ordinary calls, without this module.

This leans on three functions inside orbax 0.12.8 (`build_array_write_spec`,
`get_process_index_for_subdir`, `CommitFutureAwaitingContractedSignals`); constraints.txt pins
that version and tests/test_convert_streaming.py breaks loudly if they change.

Reading: `LeafReader` opens each stored array with TensorStore and reads any index of it; only
the chunks the index touches are decoded.
"""

import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.futures import future as orbax_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

# Orbax's own per-save context caches up to 100 MB of OCDBT nodes; with one commit per block that
# cache, not the data, would set peak memory. Every leaf of a streaming save uses this context.
_CONTEXT = ts.Context({"file_io_concurrency": {"limit": 64}, "cache_pool#ocdbt": {"total_bytes_limit": 0}})


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSource:
  """An array that exists only as chunk-aligned blocks produced on demand."""

  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  blocks: Callable[[], Iterator[tuple[tuple, np.ndarray]]]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def __deepcopy__(self, memo):  # Orbax copies host arrays before an async save; nothing to copy
    return self


class _BlockSourceHandler(ocp.type_handlers.NumpyHandler):
  """Saves a BlockSource as the numpy array it stands for."""

  def typestr(self) -> str:
    return "np.ndarray"  # restored by Orbax's stock numpy / jax.Array handlers

  async def _write(self, values, infos, args):
    for source, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = tensorstore_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=source.shape, local_shape=source.chunk_shape,
          dtype=np.dtype(source.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
      array = await ts.open(ts.Spec(spec.json), create=True, open=True, context=_CONTEXT)
      for index, block in source.blocks():
        await array[index].write(np.asarray(block, source.dtype))

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [orbax_future.CommitFutureAwaitingContractedSignals(
        self._write(values, infos, args), name="internvl_jax_block_source")]


def params_handler() -> ocp.PyTreeCheckpointHandler:
  """A PyTree handler whose leaves are BlockSources, with a registry of its own (so Orbax's global
  one, which other code relies on, is left as it is)."""
  registry = ocp.type_handlers.create_type_handler_registry((BlockSource, _BlockSourceHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class LeafReader:
  """Reads indices of the arrays of an Orbax PyTree item directory with TensorStore."""

  def __init__(self, item_dir: str):
    item_dir = os.path.abspath(item_dir)
    with open(os.path.join(item_dir, "_METADATA")) as f:
      metadata = json.load(f)
    if not metadata.get("use_ocdbt", True):
      raise ValueError(f"{item_dir}: only OCDBT Orbax checkpoints (the default) are supported.")
    self._driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    self._base = f"file://{item_dir}"
    self.paths = ["/".join(str(k["key"]) for k in leaf["key_metadata"])
                  for leaf in metadata["tree_metadata"].values()]
    self._open = {}
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})

  def read(self, path: str, index: tuple = ()) -> np.ndarray:
    if path not in self._open:
      self._open[path] = ts.open(
          {"driver": self._driver,
           "kvstore": {"driver": "ocdbt", "base": self._base, "path": path.replace("/", ".")}},
          open=True, read=True, context=self._context).result()
    return self._open[path][index].read().result()
