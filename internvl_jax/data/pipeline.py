"""grain pipelines: sources -> shuffle/repeat -> mix -> record transform -> shard -> batch.

    MapDataset per source: shuffled per epoch, repeated
      -> mixed by weight (training) or concatenated (finite evaluation streams): the global
         record order, the same for any number of processes
      -> record transform (PairProcessor / ChatProcessor) -> RecordOutcome per record
      -> this process's shard: every shard_count-th record from the start position
    IterDataset: skipped records dropped and counted -> packed (stage 3, optional) -> batched
      -> worker processes
    DataIterator (this process): issue counts summed, final batch padded, batch extras (ITM)

Everything is a function of the seed and the global record index, so the same config yields the
same batches, and the iterator state (a JSON-serializable dict) restores the exact next batch,
with the bad-record counts. Process p of n reads global records p, p + n, p + 2n, ...: the
processes read disjoint records that together are the global order, so which records make a
global batch depends on the process count (the set of records a step sees, not their number).
A state saved by another number of processes continues from the first global record some
process had not read (`DataIterator.continue_from`). Changing `worker_count` changes how
batches are formed (each worker batches its own records), so restore with the worker count that
was saved.
"""

import logging
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import flags

from internvl_jax.data import chat
from internvl_jax.data import config as config_lib
from internvl_jax.data import issues
from internvl_jax.data import negatives
from internvl_jax.data import packing as packing_lib
from internvl_jax.data import pairs
from internvl_jax.data import sources
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data.issues import ISSUE_COUNTS, RECORDS_READ, VALID

HostBatch = dict[str, np.ndarray]
# This many skipped records in a row means the data or the config is wrong throughout (an
# image size the data never has, a max_len nothing fits in): stop and say so, don't spin.
MAX_CONSECUTIVE_SKIPS = 1000


def shard_of(loader: config_lib.LoaderConfig) -> tuple[int, int]:
  """(shard_index, shard_count) of this process."""
  if loader.shard_count is not None:
    return loader.shard_index, loader.shard_count
  return jax.process_index(), jax.process_count()


def host_batch_size(loader: config_lib.LoaderConfig) -> int:
  _, count = shard_of(loader)
  if loader.global_batch_size % count:
    raise ValueError(f"global_batch_size {loader.global_batch_size} is not divisible by the "
                     f"{count} processes.")
  return loader.global_batch_size // count


def _seed(base: int, *salt: int) -> int:
  """A 32-bit seed derived from the config seed, distinct per use."""
  return int(np.random.SeedSequence([base, *salt]).generate_state(1)[0])


def records(loader: config_lib.LoaderConfig, seed_salt: int = 0) -> grain.MapDataset:
  """The global record order (every process's records): each source shuffled per epoch and
  repeated, then mixed by weight (num_epochs None) or concatenated (a finite stream ignores the
  weights)."""
  _, shard_count = shard_of(loader)
  datasets = []
  for i, source in enumerate(loader.sources):
    dataset = grain.MapDataset.source(sources.open_source(source))
    if len(dataset) < shard_count:
      raise ValueError(f"{source.name}[{source.split}] has {len(dataset)} records, fewer than "
                       f"the {shard_count} shards reading it.")
    if loader.shuffle:
      dataset = dataset.shuffle(seed=_seed(loader.seed, seed_salt, i))
    datasets.append(dataset.repeat(loader.num_epochs))
  if len(datasets) == 1:
    return datasets[0]
  if loader.num_epochs is None:
    return grain.MapDataset.mix(datasets, [s.weight for s in loader.sources])
  return grain.MapDataset.concatenate(datasets)


def shard(loader: config_lib.LoaderConfig, dataset: grain.MapDataset,
          start: int = 0) -> grain.MapDataset:
  """This process's records of the global order from global record `start` on, each as
  (index in this shard, record), so that the iterator knows how far it has read."""
  shard_index, shard_count = shard_of(loader)
  return dataset[start + shard_index::shard_count].map_with_index(lambda i, r: (i, r))


class _CountIssuesIterDataset(grain.IterDataset):
  """Drops skipped records; each kept example carries the counts gathered since the last one and
  how many records of the shard have been read up to it."""

  def __iter__(self):
    return _CountIssuesIterator(self._parent.__iter__())


class _CountIssuesIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._pending = np.zeros(len(issues.REASONS), np.int64)
    self._last_example = None
    self._consecutive_skips = 0
    self._records_read = 0

  def __next__(self):
    while True:
      try:
        index, outcome = next(self._parent)
      except StopIteration:
        return self._flush_pending()
      self._records_read = index + 1
      self._pending = self._pending + issues.count_vector(outcome.reasons)
      if outcome.example is not None:
        self._last_example = outcome.example
        self._consecutive_skips = 0
        return self._emit(outcome.example, valid=True)
      self._consecutive_skips += 1
      if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise RuntimeError(
            f"{self._consecutive_skips} records in a row were skipped; the data or the data "
            f"config is unusable. Skipped since the last good record, by reason: "
            f"{issues.counts_to_dict(self._pending)}")

  def _emit(self, example, valid: bool):
    counts, self._pending = self._pending, np.zeros_like(self._pending)
    return {**example, VALID: np.bool_(valid), ISSUE_COUNTS: counts,
            RECORDS_READ: np.int64(self._records_read)}

  def _flush_pending(self):
    """At the end of a finite stream, counts of trailing skipped records ride on a padding
    example (valid=False), so they are reported too."""
    if not self._pending.any():
      raise StopIteration
    if self._last_example is None:
      logging.warning("A data stream ended with skipped records and no example to report "
                      "them on: %s", issues.counts_to_dict(self._pending))
      raise StopIteration
    return self._emit(self._last_example, valid=False)

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending.tolist()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = np.asarray(state["pending"], np.int64)


def _use_default_flags(*unused_worker_args) -> None:
  """grain reads its absl flags when it starts workers; programs that do not parse absl flags
  (tests, notebooks, plain argparse tools) use their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batched(loader: config_lib.LoaderConfig, processed: grain.MapDataset,
            packing: packing_lib.Packing | None = None,
            layout: packing_lib.RowLayout | None = None) -> grain.IterDataset:
  """Processed records -> counted, packed (with `packing`, into rows of `layout`), batched,
  prefetched by the configured worker processes (each packs its own records)."""
  dataset = processed.to_iter_dataset(
      grain.ReadOptions(num_threads=loader.read_threads,
                        prefetch_buffer_size=2 * host_batch_size(loader)))
  dataset = _CountIssuesIterDataset(dataset)
  if packing is not None:
    dataset = packing_lib.PackedRows(dataset, packing, layout)
  dataset = dataset.batch(host_batch_size(loader), drop_remainder=loader.num_epochs is None)
  if loader.worker_count:
    _use_default_flags()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=loader.worker_count,
                                     per_worker_buffer_size=loader.worker_buffer_size),
        worker_init_fn=_use_default_flags)
  return dataset


class DataIterator:
  """Host batches (dicts of numpy arrays, leading axis the host batch) with their state.

  `build(start)` gives this process's batches of `loader`'s records from global record `start`
  on (`shard`, then `batched`). `issue_counts()` gives the skipped, truncated and converted
  records so far, by reason; the counts are part of `get_state()` and survive a restore. A final
  partial batch is padded to full size with VALID False.
  """

  def __init__(self, loader: config_lib.LoaderConfig, build: Callable[[int], grain.IterDataset],
               tokenizer_path: str, add_extras: Callable[[HostBatch, int], HostBatch] | None = None):
    self.tokenizer_path = tokenizer_path  # what the texts were tokenized with
    self._build = build
    self._shard_index = shard_of(loader)[0]
    self._batch_size = host_batch_size(loader)
    self._add_extras = add_extras
    self._counts = np.zeros(len(issues.REASONS), np.int64)
    self._batches = 0
    self._iterator = None
    self._start(0)

  def _start(self, start: int):
    """Reads this process's shard of the global order from global record `start` on."""
    self.close()
    self._iterator = iter(self._build(start))
    self._start_record = start
    self._records_read = 0  # of this process's shard since `start`

  def __iter__(self):
    return self

  def __next__(self) -> HostBatch:
    batch = dict(next(self._iterator))
    self._counts += batch.pop(ISSUE_COUNTS).sum(axis=0)
    # Worker processes deliver batches in turn, each from its own slice of the records.
    self._records_read = max(self._records_read, int(batch.pop(RECORDS_READ).max()))
    short = self._batch_size - len(batch[VALID])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    if self._add_extras is not None:
      batch = self._add_extras(batch, self._batches)
    self._batches += 1
    return batch

  def issue_counts(self) -> dict[str, int]:
    return issues.counts_to_dict(self._counts)

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "issue_counts": self.issue_counts(),
            "batches": self._batches, "start": self._start_record,
            "records_read": self._records_read}

  def set_state(self, state: dict) -> None:
    """Continues exactly where `state` (this process's, saved by as many processes) was."""
    if state["start"] != self._start_record:
      self._start(state["start"])
    self._iterator.set_state(state["grain"])
    self._counts = issues.dict_to_counts(state["issue_counts"])
    self._batches = state["batches"]
    self._records_read = state["records_read"]

  def continue_from(self, states: list[dict]) -> None:
    """Continues the run whose processes, another number of them, saved `states` (in process
    order): from the first global record that some process had not read, so that no record is
    lost; the records other processes had read past it are read again. With worker processes
    a process's position is its furthest worker's, so up to a batch per worker may be passed
    over; with packing, so may the conversations of the rows still open. The issue counts add up
    on the first process, so that their sum over processes goes on from the saved processes'
    sum."""
    count, start = len(states), states[0]["start"]  # every process of a run starts together
    firsts = [start + i + s["records_read"] * count for i, s in enumerate(states)]
    position = min(firsts)
    self._start(position)
    self._counts = np.zeros(len(issues.REASONS), np.int64)
    if self._shard_index == 0:
      self._counts = sum((issues.dict_to_counts(s["issue_counts"]) for s in states), self._counts)
    self._batches = states[0]["batches"]
    logging.warning(
        "The data position was saved by %d processes; continuing from global record %d, the "
        "first that some process had not read (%d records read before are read again).",
        count, position, sum((first - position) // count for first in firsts))

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _caption_pool(config: config_lib.PairDataConfig,
                  tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  """Tokenized captions for pool negatives, read from an independently shuffled stream.

  Unusable captions are passed over here; they are counted when training reads them.
  """
  stream = records(config.loader.replace(num_epochs=None, shuffle=True), seed_salt=1)
  pool = []
  for index in range(4 * config.itm_pool_size):
    if len(pool) == config.itm_pool_size:
      break
    try:
      caption = sources.decode_text(stream[index]["caption"], issues.CAPTION_UNDECODABLE)
    except issues.SkipRecord:
      continue
    if caption.strip():
      pool.append(tokenizer.encode_caption(caption.strip(), config.max_text_len,
                                           config.caption_prefix)[0])
  if len(pool) < 2:
    raise ValueError("Found fewer than 2 usable captions for the ITM negative pool.")
  return np.stack(pool)


def pair_pipeline(config: config_lib.PairDataConfig) -> DataIterator:
  """Image-text batches for stages 1 and 2: "image" [B, S, S, 3] float32, "text" [B, L]
  int32, and as configured "itm_text", "itg_text", "itg_labels", "class_label"; "valid". Packed
  (`config.pack_length`, stage 2): rows of pack_tiles pairs, each pair array [B, pack_tiles, ...]
  with "slot_valid" [B, pack_tiles], their ITG captions in one row of pack_length tokens with
  "itg_slots" (`data/packing.py`)."""
  tokenizer = tokenizer_lib.Tokenizer.load(config.tokenizer_path)
  loader = config.loader
  processed = records(loader).random_map(pairs.PairProcessor(config, tokenizer),
                                         seed=_seed(loader.seed, 2))
  add_extras = None
  if config.itm_negatives != "none":
    pool = _caption_pool(config, tokenizer) if config.itm_negatives == "pool" else None
    add_extras = negatives.ItmNegatives(config.itm_negatives, _seed(loader.seed, 3), pool)
  return DataIterator(
      loader, lambda start: batched(loader, shard(loader, processed, start), config.packing,
                                    packing_lib.PAIRS), config.tokenizer_path, add_extras)


def chat_pipeline(config: config_lib.ChatDataConfig) -> DataIterator:
  """Conversation batches for stage 3: "tiles" [B, T, S, S, 3] float32, "tile_count" [B],
  "tokens" / "labels" [B, max_len] int32, "token_mask" [B, max_len] bool; "valid". Packed
  (`config.pack_length`): rows of pack_length tokens and pack_tiles tiles, with "segment_ids"
  [B, pack_length] int32 in place of "token_mask" (`data/packing.py`)."""
  tokenizer = chat.load_chat_tokenizer(config.tokenizer_path, config.template)
  loader = config.loader
  processed = records(loader).map(chat.ChatProcessor(config, tokenizer))
  return DataIterator(
      loader, lambda start: batched(loader, shard(loader, processed, start), config.packing,
                                    packing_lib.CONVERSATIONS), config.tokenizer_path)
