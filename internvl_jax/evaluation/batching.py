"""Fixed-size batches: every call of a jitted model function sees the same shapes, so it
compiles once per evaluation (and once per run when the trainer evaluates repeatedly); the last
partial batch is padded by repeating its last row, and the padding's outputs are dropped."""

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np


def chunks(items: Iterable, size: int) -> Iterator[list]:
  if size < 1:
    raise ValueError(f"batch_size must be at least 1, got {size}.")
  iterator = iter(items)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` with its last row repeated up to `size` rows (a real input: no NaN from zeros)."""
  return np.pad(rows, [(0, size - len(rows))] + [(0, 0)] * (rows.ndim - 1), mode="edge")


def apply_padded(fn: Callable, rows: np.ndarray, size: int) -> np.ndarray:
  """fn on `rows` padded to `size`, outputs of the real rows only, as host numpy."""
  return np.asarray(fn(pad_rows(np.asarray(rows), size)))[:len(rows)]


def encode_texts(model, texts: Sequence[str], batch_size: int) -> np.ndarray:
  """(len(texts), embed_dim) text embeddings, `batch_size` texts per call."""
  outputs = []
  for chunk in chunks(texts, batch_size):
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    outputs.append(np.asarray(model.encode_text(padded))[:len(chunk)])
  return np.concatenate(outputs)
