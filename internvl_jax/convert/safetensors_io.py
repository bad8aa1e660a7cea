"""Streaming safetensors: read and write one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor) and the raw little-endian bytes. Knowing every shape in advance lets the
writer emit the header first and then each tensor as it is produced, so converting a checkpoint
never holds more than one tensor. Reading uses plain file reads (not mmap), so pages of tensors
already converted do not stay resident.
"""

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsFile:
  """Random access to the tensors of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw_length = f.read(8)
      (length,) = struct.unpack("<Q", raw_length) if len(raw_length) == 8 else (None,)
      if length is None or length > min(_MAX_HEADER_BYTES, os.path.getsize(path)):
        raise ValueError(f"{path} is not a safetensors file (no valid header).")
      try:
        header = json.loads(f.read(length))
      except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file (header is not JSON).") from None
    self.metadata = header.pop("__metadata__", {})
    self._data_start = 8 + length
    self._entries = header
    for key, entry in header.items():
      if entry.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}.")

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return DTYPES[self._entries[key]["dtype"]]

  def read(self, key: str, rows: slice = slice(None)) -> np.ndarray:
    """The tensor, or a range of its rows (axis 0), read from disk into a fresh array."""
    entry = self._entries[key]
    shape, dtype = tuple(entry["shape"]), DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    if int(np.prod(shape)) * dtype.itemsize != end - begin:
      raise ValueError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {list(shape)}.")
    if shape:
      first, last, _ = rows.indices(shape[0])
      row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
      begin, shape = begin + first * row_bytes, (last - first,) + shape[1:]
    out = np.empty(shape, dtype)
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
        raise ValueError(f"{self.path}: tensor {key!r} is truncated.")
    return out


def _header(plan: dict[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[bytes, int]:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, (shape, dtype) in plan.items():
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                   "data_offsets": [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the reference writer
  return struct.pack("<Q", len(encoded)) + encoded, offset


def shard_plan(plan: dict, max_shard_bytes: int) -> list[dict]:
  """Splits an ordered {key: (shape, dtype)} plan into consecutive shards of at most max_shard_bytes."""
  shards, current, size = [], {}, 0
  for key, (shape, dtype) in plan.items():
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = (shape, dtype)
    size += nbytes
  return shards + [current] if current or not shards else shards


def write_streaming(out_dir: str, plan: dict, tensors: Iterable[tuple[str, Iterable[np.ndarray]]], *,
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes model.safetensors, or shards plus an index, from tensors given in plan order, each
  as its rows block by block (C order), so that no more than one block is held at a time."""
  shards = shard_plan(plan, max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  tensors = iter(tensors)
  for name, shard in zip(names, shards):
    header, _ = _header(shard)
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(header)
      for want_key, (shape, dtype) in shard.items():
        key, blocks = next(tensors)
        if key != want_key:
          raise ValueError(f"Expected tensor {want_key}, got {key}.")
        written = 0
        for block in blocks:
          data = np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8)
          f.write(data.data)
          written += data.nbytes
        if written != int(np.prod(shape)) * np.dtype(dtype).itemsize:
          raise ValueError(f"Tensor {key}: wrote {written} bytes for shape {tuple(shape)}.")
  if len(shards) > 1:
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in plan.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names
