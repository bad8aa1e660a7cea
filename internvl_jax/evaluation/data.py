"""Evaluation data: which TFDS split a task reads, its records, and the paper's eval preprocessing.

`data` names the dataset:
  "demo" / "demo:SPLIT"      the built-in demo shapes (`internvl_jax.data.demo`), built on first
                             use at the model's image size; by default zero-shot reads the
                             "zero_shot" split (held-out classes), the other tasks "test".
  "tfds:NAME[:SPLIT]"        a TFDS dataset prepared locally (ArrayRecord), e.g.
                             "tfds:imagenet2012:validation", "tfds:coco_captions:test"; by default
                             the first of "validation", "val", "test" it has.
Records are read with `tfds.data_source` (no TensorFlow), in order, the first `limit` of them.
"""

import dataclasses
import logging
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from internvl_jax.data import chat as chat_data
from internvl_jax.data import config as config_lib
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data import transforms

_DEFAULT_SPLITS = ("validation", "val", "test")
# The one demo question whose answer is not a function of the image: its caption has one of the
# demo's random templates, so no answer can be expected to match it exactly.
_DEMO_FREE_FORM_QUESTIONS = ("Describe the image.",)
# TFDS `imagenet2012` labels are WordNet ids ("n01440764"), which no text tower can read.
_WORDNET_ID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True)
class EvalData:
  """One TFDS split to evaluate on; `is_demo` for the built-in demo shapes."""

  name: str
  split: str
  data_dir: str | None
  is_demo: bool

  def source(self):
    return sources.open_source(config_lib.Source(self.name, self.split, data_dir=self.data_dir))


def resolve(data: str, task: str, image_size: int, data_dir: str | None = None) -> EvalData:
  """The split `data` names for `task` (see the module docstring)."""
  kind, _, rest = data.partition(":")
  if kind == "demo":
    name = demo.ensure_dataset(image_size=image_size, data_dir=data_dir)
    split = rest or ("zero_shot" if task == "zero_shot" else "test")
    if split not in demo.SPLITS:
      raise ValueError(f"The demo data has splits {tuple(demo.SPLITS)}, not {split!r}.")
    return EvalData(name, split, data_dir, is_demo=True)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    available = list(_info(name, data_dir).splits)
    if not split:
      split = next((s for s in _DEFAULT_SPLITS if s in available), None)
      if split is None:
        raise ValueError(f"tfds:{name} has splits {sorted(available)}, none of {_DEFAULT_SPLITS}; "
                         f"name one: tfds:{name}:SPLIT.")
    elif split.split("[")[0] not in available:  # "validation[:1000]" slices are allowed
      raise ValueError(f"tfds:{name} has splits {sorted(available)}, not {split!r}.")
    return EvalData(name, split, data_dir, is_demo=False)
  raise ValueError(f"data must be 'demo', 'demo:SPLIT' or 'tfds:NAME[:SPLIT]', got {data!r}.")


def _info(name: str, data_dir: str | None):
  """The prepared dataset's `DatasetInfo` (splits, features), read from its directory."""
  try:
    return tfds.builder(name, data_dir=data_dir or sources.default_data_dir()).info
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"No TFDS dataset {name!r} in {data_dir or sources.default_data_dir()}; "
                     "prepare it there first.") from e


def records(data: EvalData, limit: int | None) -> Iterator[dict]:
  """The split's records in order, at most `limit` of them."""
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be at least 1, got {limit}.")
  source = data.source()
  count = len(source) if limit is None else min(limit, len(source))
  for index in range(count):
    yield source[index]


def decode_image(value) -> tuple[Image.Image, tuple[str, ...]]:
  """An RGB image from encoded bytes (datasets written by internvl_jax) or a decoded uint8
  array (TFDS `Image` features: 1 to 4 channels), converted by `transforms.to_rgb` (alpha
  dropped), and the reasons to count; raises `issues.SkipRecord` for an unusable one."""
  if isinstance(value, (bytes, np.bytes_)):
    return transforms.decode_rgb(bytes(value), min_side=1)
  array = np.asarray(value)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]  # PIL reads uint8 arrays of 2 dimensions, or 2, 3, 4 channels
  channels = array.shape[-1] if array.ndim == 3 else 1
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
    raise issues.SkipRecord(issues.IMAGE_UNDECODABLE,
                            f"image array of shape {array.shape} and dtype {array.dtype}")
  return transforms.to_rgb(Image.fromarray(array))


def pixels(image: Image.Image, size: int, crop: bool) -> np.ndarray:
  """(size, size, 3) normalized pixels, as spec 3.5: classification resizes the shorter side and
  center-crops (`crop`), retrieval and captioning resize to the square; bicubic, ImageNet stats."""
  image = transforms.resize_center_crop(image, size) if crop else transforms.resize(image, size)
  return transforms.to_normalized_array(image)


def _text(value) -> str:
  return sources.decode_text(value, issues.CAPTION_UNDECODABLE).strip()


def captions(record: dict) -> list[str]:
  """The record's reference captions: "captions" (COCO: {"text": [...]}; the demo: a list, its
  "caption" first) when there, else "caption" (one)."""
  if "captions" in record:
    value = record["captions"]
    return [_text(text) for text in (value["text"] if isinstance(value, dict) else value)]
  if "caption" in record:
    return [_text(record["caption"])]
  raise ValueError(f"The records have no 'caption' or 'captions' feature (keys: {sorted(record)}).")


def label(record: dict) -> int:
  if "label" not in record:
    raise ValueError(f"Zero-shot classification needs a 'label' feature (keys: {sorted(record)}).")
  return int(record["label"])


def class_names(data: EvalData, override: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """The names the classifier is built from: `override`, else all 36 demo classes (the held-out
  split is classified among every class, not only its 6), else the TFDS label names with
  underscores as spaces."""
  if override is not None:
    return tuple(override)
  if data.is_demo:
    return demo.CLASS_NAMES
  feature = _info(data.name, data.data_dir).features
  if "label" not in feature or not hasattr(feature["label"], "names"):
    raise ValueError(f"{data.name} has no 'label' ClassLabel feature to take class names from.")
  names = tuple(name.replace("_", " ") for name in feature["label"].names)
  if all(_WORDNET_ID.match(name) for name in names):
    raise ValueError(f"{data.name}'s labels are WordNet ids ({names[0]}, ...); pass readable "
                     "class names (one per line, in label order) with --class-names.")
  return names


def question_answers(record: dict, is_demo: bool) -> list[tuple[str, str]]:
  """(question, reference answer) pairs of the record's conversation, each to be asked on its
  own as a one-turn question; the demo's free-form "Describe the image." is left out."""
  turns = chat_data.decode_turns(record["conversations"])
  pairs = []
  for (role, question), (next_role, answer) in zip(turns, turns[1:]):
    if role != templates.HUMAN or next_role != templates.ASSISTANT:
      continue
    question = question.replace(templates.IMAGE_PLACEHOLDER, "").strip()
    if is_demo and question in _DEMO_FREE_FORM_QUESTIONS:
      continue
    pairs.append((question, answer))
  return pairs


def with_images(items: Iterator[dict], task: str) -> Iterator[tuple[dict, Image.Image]]:
  """(record, decoded image) of the records whose image decodes; the others are logged and
  counted, not scored. Images converted to RGB are counted by their mode."""
  counter = issues.IssueCounter()
  for record in items:
    try:
      image, conversions = decode_image(record["image"])
    except issues.SkipRecord as e:
      counter[e.reason] += 1
      logging.warning("%s: skipping a record: %s", task, e)
      continue
    counter.update(conversions)
    yield record, image
  if counter.skipped():
    logging.warning("%s: %d records skipped for unusable images: %s", task, counter.skipped(),
                    counter.skipped_by_reason())
  if counter.converted_by_mode():
    logging.info("%s: images converted to RGB, by mode: %s", task, counter.converted_by_mode())
