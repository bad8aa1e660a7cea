"""Reading PyTorch checkpoint directories: config.json plus weights, one tensor at a time.

Weights may be safetensors (one file or shards with an index) or `.bin` / `.pth` pickles, which
are opened with `torch.load(weights_only=True)` only: no arbitrary code is ever unpickled.
"""

import glob
import json
import os

import ml_dtypes
import numpy as np

from internvl_jax.convert.safetensors_io import INDEX_FILE, SafetensorsFile

_TORCH_INDEX_FILE = "pytorch_model.bin.index.json"


class TensorSource:
  """Tensors of a checkpoint by key, read one at a time, under the names the layout reads."""

  def __init__(self, readers: dict):
    self._readers = readers  # key -> (object with .read(key), the key in the file)

  def keys(self) -> set[str]:
    return set(self._readers)

  def shape(self, key: str) -> tuple[int, ...]:
    reader, stored = self._readers[key]
    return reader.shape(stored)

  def dtype(self, key: str) -> np.dtype:
    reader, stored = self._readers[key]
    return reader.dtype(stored)

  def read(self, key: str, rows: slice = slice(None)) -> np.ndarray:
    reader, stored = self._readers[key]
    return reader.read(stored, rows)

  def with_prefix(self, prefixes: tuple[str, ...]) -> "TensorSource":
    """Strips the first of `prefixes` under which every key lies (none if no prefix fits)."""
    for prefix in prefixes:
      if self._readers and all(k.startswith(prefix) for k in self._readers):
        return TensorSource({k[len(prefix):]: v for k, v in self._readers.items()})
    return self

  def renamed(self, renames: tuple[tuple[str, str], ...]) -> "TensorSource":
    """Keys that begin with an older prefix under the newer one, as transformers' checkpoint
    conversion mapping reads them; a key that then names a tensor twice raises."""
    readers = {}
    for key, value in self._readers.items():
      new = next((new + key[len(old):] for old, new in renames if key.startswith(old)), key)
      if new in readers:
        raise ValueError(f"The checkpoint holds {new} twice, under older and newer names.")
      readers[new] = value
    return TensorSource(readers)


class _TorchFile:
  def __init__(self, path: str):
    import torch  # the `torch` extra; only needed for pickled checkpoints

    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for anything that is not a weights file
      raise ValueError(f"{path} is not a PyTorch weights file that loads with weights_only=True: "
                       f"{error}") from None
    for wrapper in ("module", "model", "state_dict"):  # timm / DeepSpeed style wrapping
      if isinstance(state, dict) and set(state) == {wrapper}:
        state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      raise ValueError(f"{path} does not hold a state dict of tensors.")
    self._state = state

  def keys(self):
    return list(self._state)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._state[key].shape)

  def dtype(self, key: str) -> np.dtype:
    import torch

    tensor = self._state[key]
    return np.dtype(ml_dtypes.bfloat16) if tensor.dtype == torch.bfloat16 else np.dtype(
        torch.empty((), dtype=tensor.dtype).numpy().dtype)

  def read(self, key: str, rows: slice = slice(None)) -> np.ndarray:
    import torch

    tensor = self._state[key]
    tensor = (tensor[rows] if tensor.ndim else tensor).contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{directory} is not a PyTorch checkpoint directory: it has no config.json.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from None


def _weight_files(directory: str) -> tuple[list[str], type]:
  for index_name, opener in ((INDEX_FILE, SafetensorsFile), (_TORCH_INDEX_FILE, _TorchFile)):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(directory, n) for n in names], opener
  for pattern, opener in (("*.safetensors", SafetensorsFile), ("*.bin", _TorchFile),
                          ("*.pth", _TorchFile), ("*.pt", _TorchFile)):
    files = sorted(glob.glob(os.path.join(directory, pattern)))
    if files:
      return files, opener
  raise ValueError(f"{directory} has no weights (*.safetensors, *.bin, *.pth or an index file).")


def open_weights(directory: str) -> TensorSource:
  files, opener = _weight_files(directory)
  readers = {}
  for path in files:
    reader = opener(path)
    for key in reader.keys():
      readers[key] = (reader, key)
  return TensorSource(readers)
