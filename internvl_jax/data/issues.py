"""Reasons a record is skipped, truncated or converted, and the counters that report them.

Bad input never stops a run and is never dropped silently: every record that is
skipped, every text that is truncated, and every image decoded from a mode other than
RGB is counted under one of these reasons. The pipelines carry the counts as a
fixed-length vector (indexed by `REASONS`) so they can travel through grain batches
and worker processes.
"""

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Records skipped.
IMAGE_MISSING = "image_missing"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_TOO_SMALL = "image_too_small"
CAPTION_EMPTY = "caption_empty"
CAPTION_UNDECODABLE = "caption_undecodable"
CONVERSATION_MALFORMED = "conversation_malformed"
CONVERSATION_NO_IMAGE_PLACEHOLDER = "conversation_no_image_placeholder"
CONVERSATION_MULTIPLE_IMAGE_PLACEHOLDERS = "conversation_multiple_image_placeholders"
CONVERSATION_NO_ASSISTANT_TURN = "conversation_no_assistant_turn"
# The image tokens and at least one answer token do not fit in the maximum length.
CONVERSATION_TOO_LONG = "conversation_too_long"
# Import only: the annotation itself cannot be read.
ANNOTATION_UNREADABLE = "annotation_unreadable"
MULTIPLE_IMAGES = "multiple_images"

# Records kept, text shortened.
CAPTION_TRUNCATED = "caption_truncated"
CONVERSATION_TRUNCATED = "conversation_truncated"

SKIP_REASONS = (
    IMAGE_MISSING, IMAGE_UNDECODABLE, IMAGE_TOO_SMALL,
    CAPTION_EMPTY, CAPTION_UNDECODABLE, CONVERSATION_MALFORMED,
    CONVERSATION_NO_IMAGE_PLACEHOLDER, CONVERSATION_MULTIPLE_IMAGE_PLACEHOLDERS,
    CONVERSATION_NO_ASSISTANT_TURN, CONVERSATION_TOO_LONG,
    ANNOTATION_UNREADABLE, MULTIPLE_IMAGES,
)
TRUNCATION_REASONS = (CAPTION_TRUNCATED, CONVERSATION_TRUNCATED)

# Records kept, image converted to RGB, by the PIL mode it was stored in. The modes are a
# fixed set so the count vector keeps its length; any other mode counts as "other".
CONVERTED_MODES = ("1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F")
OTHER_MODE = "other"
CONVERSION_REASONS = {mode: f"image_converted_from_{mode.lower().replace(';', '')}"
                      for mode in (*CONVERTED_MODES, OTHER_MODE)}

# What the pipeline's counting stage adds to each example, and packing carries over to its rows.
ISSUE_COUNTS = "issue_counts"  # count vector since the example before; consumed by DataIterator
RECORDS_READ = "records_read"  # records of the shard read up to the example; likewise
VALID = "valid"  # bool: False on padding (of a final partial batch, or carrying final counts)

REASONS = SKIP_REASONS + TRUNCATION_REASONS + tuple(CONVERSION_REASONS.values())
_REASON_INDEX = {reason: i for i, reason in enumerate(REASONS)}


class SkipRecord(Exception):
  """Raised by record transforms for input that must be skipped."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; known: {SKIP_REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class RecordOutcome:
  """What a record transform made of one record: an example, or None if it was skipped,
  and the reasons it was skipped, truncated or converted."""

  example: dict[str, Any] | None
  reasons: tuple[str, ...] = ()


def outcome_of(process, *args) -> RecordOutcome:
  """Runs process(*args) -> RecordOutcome, turning a `SkipRecord` into a skipped outcome."""
  try:
    return process(*args)
  except SkipRecord as e:
    return RecordOutcome(None, (e.reason,))


def converted_from(mode: str) -> str:
  """The reason counting an image converted to RGB from PIL mode `mode`."""
  return CONVERSION_REASONS.get(mode, CONVERSION_REASONS[OTHER_MODE])


def count_vector(reasons: Iterable[str]) -> np.ndarray:
  """Counts of `reasons` as an int64 vector indexed like `REASONS`."""
  counts = np.zeros(len(REASONS), np.int64)
  for reason in reasons:
    counts[_REASON_INDEX[reason]] += 1
  return counts


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
  """Non-zero entries of a count vector, by reason."""
  return {r: int(c) for r, c in zip(REASONS, counts) if c}


def dict_to_counts(counts: Mapping[str, int]) -> np.ndarray:
  """The count vector of a `counts_to_dict` result. Reasons this version no longer has (an
  older checkpoint's iterator state) are dropped with a warning, so the run still resumes."""
  vector = np.zeros(len(REASONS), np.int64)
  for reason, count in counts.items():
    if reason not in _REASON_INDEX:
      logging.warning("Dropping the count of a retired data issue reason: %s=%d", reason, count)
      continue
    vector[_REASON_INDEX[reason]] = count
  return vector


class IssueCounter(collections.Counter):
  """Counts by reason, for the importers (which run outside grain)."""

  def skipped(self) -> int:
    return sum(self.skipped_by_reason().values())

  def skipped_by_reason(self) -> dict[str, int]:
    return {r: self[r] for r in sorted(self) if r in SKIP_REASONS and self[r]}

  def converted_by_mode(self) -> dict[str, int]:
    """Images converted to RGB, by the mode they were stored in ("other" for the rest)."""
    return {mode: self[reason] for mode, reason in sorted(CONVERSION_REASONS.items())
            if self[reason]}
