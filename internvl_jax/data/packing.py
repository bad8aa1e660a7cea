"""Sequence packing: several examples per row, each under its own segment id.

Stage 3 packs conversations, as the official packed dataset (`internvl/train/dataset_packed.py`,
chat spec 6.4) builds its rows; stage 2 packs image-text pairs by their ITG captions. Examples
go into open rows ("buffers"), each into the open row with the least room left that still holds
its tokens and slots (best fit), or into a new row. A row is emitted when it is exactly full, in
tokens (`pack_length`) or in slots (`pack_tiles`: tiles, the official `num_images_expected`, or
images), or, while more than `buffer_size` rows are open, the oldest one. At the end of a finite
stream the open rows are emitted, oldest first. Differences from the official packer: it
appends to the first buffer that fits (its list sorted by tile count), where best fit fills rows
better; it emits the buffer with the most tiles when over `max_buffer_size`, where emitting the
oldest bounds how long a conversation waits in an open row, and so how far back a restore reads
(below); and it splits an over-long buffer at `max_packed_tokens`, which cannot happen here
because a conversation is at most `max_len` tokens and `max_tiles_per_image` tiles, no more than
a row (`ChatDataConfig` checks).

A packed conversation row (`CONVERSATIONS`): "tokens" / "labels" (pack_length,) int32;
"segment_ids" (pack_length,) int32, 0 on padding and 1, 2, 3, ... per conversation (the
decoder's packed `attention_mask`: attention within a conversation, positions restarting at 0);
"tiles" (pack_tiles, S, S, 3) float32, the conversations' tiles in conversation order (as the
image-context tokens are) and zero after; "tile_count" int32. Each conversation's first label is
IGNORE_LABEL: the token before it belongs to the conversation before, so it is never a target (in
a row of its own it is never one either).

A packed pair row (`PAIRS`): each pair key ("image", "text", ...) (pack_tiles, ...) with the
pairs in slot order and zeros after, "slot_valid" (pack_tiles,) bool; the ITG captions
concatenated in slot order as "itg_text" / "itg_labels" (pack_length,) with "itg_slots" their
slot, 1, 2, ... (0 on padding). A caption's first label is its BOS's, never a target.

The iterator state holds, besides its input's, which examples the open rows hold (their positions
in the input) and the input's state before the oldest of them: a restore reads the input again
from there to rebuild the open rows, so a resumed run packs exactly the same rows.
"""

import dataclasses
from collections.abc import Callable

import grain
import numpy as np

from internvl_jax.data import issues
from internvl_jax.data.issues import ISSUE_COUNTS, RECORDS_READ, VALID
from internvl_jax.data.tokenizer import IGNORE_LABEL, PAD_ID


@dataclasses.dataclass(frozen=True)
class Packing:
  """Rows of `pack_length` tokens and `pack_tiles` slots (tiles or images), at most `buffer_size`
  open (`ChatDataConfig.packing` and `PairDataConfig.packing`, which check them)."""

  pack_length: int
  pack_tiles: int
  buffer_size: int


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """What is packed: an example's tokens and slots, and how a row of examples is built."""

  tokens: Callable[[dict], int]
  slots: Callable[[dict], int]
  build: Callable[[list[dict], Packing], dict]


@dataclasses.dataclass(eq=False)  # rows are removed by identity
class _Row:
  """An open row: its examples and their positions in the input stream."""

  examples: list = dataclasses.field(default_factory=list)
  positions: list = dataclasses.field(default_factory=list)
  tokens: int = 0
  slots: int = 0

  def add(self, position: int, example: dict, tokens: int, slots: int) -> None:
    self.examples.append(example)
    self.positions.append(position)
    self.tokens += tokens
    self.slots += slots


class PackedRows(grain.IterDataset):
  """Packs the counted examples of `parent` into rows of `layout` (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, packing: Packing, layout: RowLayout):
    super().__init__(parent)
    self._packing = packing
    self._layout = layout

  def __iter__(self):
    return _PackingIterator(self._parent.__iter__(), self._packing, self._layout)


class _PackingIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, packing: Packing, layout: RowLayout):
    super().__init__(parent)
    self._packing = packing
    self._layout = layout
    self._rows: list[_Row] = []
    self._read = 0  # examples read from the parent
    self._states = {}  # position -> the parent's state before it, for the open rows' examples
    self._pending = np.zeros(len(issues.REASONS), np.int64)
    self._records_read = np.int64(0)
    self._last_example = None
    self._exhausted = False

  def __next__(self):
    while not self._exhausted:
      row = self._read_one()
      if row is not None:
        return self._emit(row)
      if len(self._rows) > self._packing.buffer_size:
        return self._emit(self._rows.pop(0))
    if self._rows:
      return self._emit(self._rows.pop(0))
    if self._pending.any() and self._last_example is not None:
      return self._emit_counts_only()
    raise StopIteration

  def _read_one(self) -> _Row | None:
    """Reads one example into an open row; returns that row if it is now full."""
    state = self._parent.get_state()
    try:
      example = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return None
    position = self._read
    self._read += 1
    self._pending += example[ISSUE_COUNTS]
    self._records_read = max(self._records_read, example[RECORDS_READ])
    if not example[VALID]:  # a finite stream's last counts, on a padding example
      return None
    self._last_example = example
    self._states[position] = state
    row = self._place(position, example)
    packing = self._packing
    if row.tokens == packing.pack_length or row.slots == packing.pack_tiles:
      self._rows.remove(row)
      return row
    return None

  def _add(self, row: _Row, position: int, example: dict) -> None:
    row.add(position, example, self._layout.tokens(example), self._layout.slots(example))

  def _place(self, position: int, example: dict) -> _Row:
    packing = self._packing
    tokens, slots = self._layout.tokens(example), self._layout.slots(example)
    if tokens > packing.pack_length or slots > packing.pack_tiles:
      raise ValueError(f"An example of {tokens} tokens and {slots} slots does not fit a packed "
                       f"row of {packing.pack_length} tokens and {packing.pack_tiles} slots.")
    fits = [row for row in self._rows if row.tokens + tokens <= packing.pack_length
            and row.slots + slots <= packing.pack_tiles]
    if fits:
      row = max(fits, key=lambda r: r.tokens)
    else:
      row = _Row()
      self._rows.append(row)
    self._add(row, position, example)
    return row

  def _emit(self, row: _Row) -> dict:
    for position in row.positions:
      del self._states[position]
    return {**self._layout.build(row.examples, self._packing), VALID: np.bool_(True),
            **self._take_counts()}

  def _emit_counts_only(self) -> dict:
    """Counts of a finite stream's trailing skipped records, on an empty row (valid False)."""
    empty = self._layout.build([self._last_example], self._packing)
    return {**{k: np.zeros_like(v) for k, v in empty.items()}, VALID: np.bool_(False),
            **self._take_counts()}

  def _take_counts(self) -> dict:
    counts, self._pending = self._pending, np.zeros_like(self._pending)
    return {ISSUE_COUNTS: counts, RECORDS_READ: np.int64(self._records_read)}

  def get_state(self):
    if self._states:
      oldest = min(self._states)
      replay = {"from": oldest, "parent": self._states[oldest]}
    else:
      replay = None
    return {"parent": self._parent.get_state(), "read": self._read,
            "rows": [list(row.positions) for row in self._rows], "replay": replay,
            "pending": self._pending.tolist(), "records_read": int(self._records_read),
            "exhausted": self._exhausted}

  def set_state(self, state):
    """Rebuilds the open rows by reading the parent again from before their oldest example;
    that reading's issue counts were counted when first read and are dropped."""
    self._rows, self._states, self._last_example = [], {}, None
    wanted = {position: i for i, positions in enumerate(state["rows"])
              for position in positions}
    examples, replay = {}, state["replay"]
    if replay is not None:
      self._parent.set_state(replay["parent"])
      for position in range(replay["from"], state["read"]):
        before = self._parent.get_state()
        example = next(self._parent)
        if position in wanted:
          examples[position] = example
          self._states[position] = before
    for positions in state["rows"]:
      row = _Row()
      for position in positions:
        self._add(row, position, examples[position])
        self._last_example = examples[position]
      self._rows.append(row)
    self._parent.set_state(state["parent"])
    self._read = state["read"]
    self._pending = np.asarray(state["pending"], np.int64)
    self._records_read = np.int64(state["records_read"])
    self._exhausted = state["exhausted"]


def _conversation_tokens(example: dict) -> int:
  return int(np.sum(example["token_mask"]))


def pack_conversations(examples: list[dict], packing: Packing) -> dict:
  """One row of conversations `examples`, in order, padded to the packing's tokens and tiles."""
  first = examples[0]
  tokens = np.zeros((packing.pack_length,), first["tokens"].dtype)
  labels = np.full((packing.pack_length,), IGNORE_LABEL, first["labels"].dtype)
  segment_ids = np.zeros((packing.pack_length,), np.int32)
  tiles = np.zeros((packing.pack_tiles,) + first["tiles"].shape[1:], first["tiles"].dtype)
  start = tile_start = 0
  for segment, example in enumerate(examples, 1):
    length, count = _conversation_tokens(example), int(example["tile_count"])
    tokens[start:start + length] = example["tokens"][:length]
    labels[start:start + length] = example["labels"][:length]
    labels[start] = IGNORE_LABEL
    segment_ids[start:start + length] = segment
    tiles[tile_start:tile_start + count] = example["tiles"][:count]
    start, tile_start = start + length, tile_start + count
  return {"tokens": tokens, "labels": labels, "segment_ids": segment_ids, "tiles": tiles,
          "tile_count": np.int32(tile_start)}


_CAPTION_KEYS = ("itg_text", "itg_labels")
_BOOKKEEPING_KEYS = (VALID, ISSUE_COUNTS, RECORDS_READ)


def _caption_tokens(example: dict) -> int:
  return int(np.sum(example["itg_text"] != PAD_ID))


def pack_pairs(examples: list[dict], packing: Packing) -> dict:
  """One row of image-text pairs `examples`, in slot order, their ITG captions concatenated."""
  first = examples[0]
  keys = [key for key in first if key not in _CAPTION_KEYS + _BOOKKEEPING_KEYS]
  row = {key: np.zeros((packing.pack_tiles,) + np.shape(first[key]), np.asarray(first[key]).dtype)
         for key in keys}
  itg_text = np.full((packing.pack_length,), PAD_ID, first["itg_text"].dtype)
  itg_labels = np.full((packing.pack_length,), IGNORE_LABEL, first["itg_labels"].dtype)
  itg_slots = np.zeros((packing.pack_length,), np.int32)
  start = 0
  for slot, example in enumerate(examples):
    for key in keys:
      row[key][slot] = example[key]
    length = _caption_tokens(example)
    itg_text[start:start + length] = example["itg_text"][:length]
    itg_labels[start:start + length] = example["itg_labels"][:length]
    itg_slots[start:start + length] = slot + 1
    start += length
  return {**row, "slot_valid": np.arange(packing.pack_tiles) < len(examples),
          "itg_text": itg_text, "itg_labels": itg_labels, "itg_slots": itg_slots}


CONVERSATIONS = RowLayout(_conversation_tokens, lambda example: int(example["tile_count"]),
                          pack_conversations)
PAIRS = RowLayout(_caption_tokens, lambda example: 1, pack_pairs)
