"""ITM negatives for stage 2 (spec 4.2): for each image, the caption of another image.

Modes: "batch" picks a random other caption of the host batch; "batch_hard" picks the batch
caption sharing the most tokens with the positive one (lexically hard; similarity-based
mining with the model's ITC scores belongs to the training step); "pool" picks a random
caption from a fixed pool read once when the pipeline starts. A negative never has exactly the
positive's tokens unless every candidate does.
"""

import numpy as np

_HASH_BUCKETS = 1024  # token ids are hashed into this many bag-of-words buckets


def _row_ids(texts: np.ndarray) -> np.ndarray:
  """Equal rows get equal ids."""
  return np.unique(texts, axis=0, return_inverse=True)[1].ravel()


def _token_bags(texts: np.ndarray) -> np.ndarray:
  bags = np.zeros((texts.shape[0], _HASH_BUCKETS), np.float32)
  rows, cols = np.nonzero(texts)  # padding (id 0) is not a token
  bags[rows, texts[rows, cols] % _HASH_BUCKETS] = 1.0
  return bags


def batch_negative_indices(texts: np.ndarray, rng: np.random.Generator, hard: bool,
                           candidates: np.ndarray | None = None) -> np.ndarray:
  """Index, for each row of `texts` [B, L], of another row to use as its negative, chosen among
  the rows where `candidates` [B] is True (default: every row)."""
  batch = texts.shape[0]
  ids = _row_ids(texts)
  if hard:
    bags = _token_bags(texts)
    # Shared-token counts are integers, so noise below 1 only breaks ties.
    score = bags @ bags.T + rng.uniform(0.0, 0.5, (batch, batch))
  else:
    score = rng.uniform(size=(batch, batch))
  allowed = ids[:, None] != ids[None, :]
  if candidates is not None:
    allowed &= candidates[None, :]
  score = np.where(allowed, score, -np.inf)
  choice = np.argmax(score, axis=1)
  no_candidate = np.isneginf(score.max(axis=1))
  choice[no_candidate] = (np.arange(batch)[no_candidate] + 1) % batch
  return choice


def pool_negatives(texts: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
                   tries: int = 8) -> np.ndarray:
  """A random row of `pool` [P, L] for each row of `texts`, differing from it if any of
  `tries` draws does."""
  candidates = rng.integers(0, pool.shape[0], (texts.shape[0], tries))
  equal = (pool[candidates] == texts[:, None, :]).all(axis=-1)
  first_different = np.argmin(equal, axis=1)
  return pool[candidates[np.arange(texts.shape[0]), first_different]]


class ItmNegatives:
  """Adds "itm_text" [B, L], a negative for every row, and "itm_label" [B] int32 to a host batch.

  As the reference splits each rank's batch, the first B - B // 2 rows are labelled 0 (trained
  on their negative) and the rest 1 (their own caption). Packed batches ("text" [B, K, L], with
  "slot_valid" [B, K]) are taken as their B x K slots, and only filled slots give negatives.
  Random choices depend on (seed, batch index).
  """

  def __init__(self, mode: str, seed: int, pool: np.ndarray | None = None):
    if mode == "pool" and (pool is None or len(pool) < 2):
      raise ValueError("ITM negatives from a pool need a pool of at least 2 captions.")
    self._mode = mode
    self._seed = seed
    self._pool = pool

  def __call__(self, batch: dict[str, np.ndarray], batch_index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, batch_index])
    shape = batch["text"].shape
    texts = batch["text"].reshape(-1, shape[-1])
    if self._mode == "pool":
      negatives = pool_negatives(texts, self._pool, rng)
    else:
      filled = batch["slot_valid"].reshape(-1) if "slot_valid" in batch else None
      negatives = texts[batch_negative_indices(texts, rng, self._mode == "batch_hard", filled)]
    pairs = len(texts)
    labels = (np.arange(pairs) >= pairs - pairs // 2).astype(np.int32)
    return {**batch, "itm_text": negatives.reshape(shape), "itm_label": labels.reshape(shape[:-1])}
