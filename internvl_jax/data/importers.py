"""Importers from the formats users have to keyed records for `sources.write_dataset`.

  image_folder_records:  a folder of images and a JSONL file of {"image": path, "caption": text}
  webdataset_records:    tar shards as img2dataset writes them (key.jpg + key.txt / key.json)
  internvl_chat_records: one dataset of an InternVL-Chat meta JSON (JSONL lines with "image" and
                         "conversations", paths relative to the dataset's "root")

Each record is checked as the pipelines will check it (image decodes and is big enough;
caption non-empty; conversation well formed); a bad one is skipped and counted in `counter`.
Images are stored as they were encoded; one in a mode other than RGB is counted in `counter` by
that mode, as the pipelines will convert it to RGB when they read it.
"""

import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator

from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data import transforms

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
META_KEYS = ("root", "annotation")


def _read_image(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise issues.SkipRecord(issues.IMAGE_MISSING, str(e)) from e


def _check_image(data: bytes, min_side: int) -> tuple[str, ...]:
  """Raises `issues.SkipRecord` for an image the pipelines would skip; else the reasons to
  count once the record is kept (its conversion to RGB, if any)."""
  _, conversions = transforms.decode_rgb(data, min_side)
  return conversions


def _check_caption(caption) -> str:
  if not isinstance(caption, str):
    raise issues.SkipRecord(issues.CAPTION_UNDECODABLE, f"caption is {type(caption).__name__}")
  if not caption.strip():
    raise issues.SkipRecord(issues.CAPTION_EMPTY)
  return caption.strip()


def _json_lines(path: str, counter: issues.IssueCounter) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-empty line; unparsable lines are counted."""
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_number, line in enumerate(f):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:
        counter[issues.ANNOTATION_UNREADABLE] += 1
        continue
      if not isinstance(entry, dict):
        counter[issues.ANNOTATION_UNREADABLE] += 1
        continue
      yield line_number, entry


def image_folder_records(images_dir: str, captions_jsonl: str, counter: issues.IssueCounter,
                         image_key: str = "image", caption_key: str = "caption",
                         min_side: int = 2) -> Iterator[tuple[str, sources.Record]]:
  for line_number, entry in _json_lines(captions_jsonl, counter):
    if not isinstance(entry.get(image_key), str):
      counter[issues.ANNOTATION_UNREADABLE] += 1
      continue
    try:
      caption = _check_caption(entry.get(caption_key))
      image = _read_image(os.path.join(images_dir, entry[image_key]))
      conversions = _check_image(image, min_side)
    except issues.SkipRecord as e:
      counter[e.reason] += 1
      continue
    counter.update(conversions)
    yield f"{line_number:010d}", {"image": image, "caption": caption}


def _webdataset_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) of consecutive members sharing a key (the path up to the first
  dot of the file name), as WebDataset groups them."""
  key, sample = None, {}
  for member in tar:
    if not member.isfile():
      continue
    directory, name = os.path.split(member.name)
    stem, _, extension = name.partition(".")
    member_key = os.path.join(directory, stem)
    if member_key != key:
      if sample:
        yield key, sample
      key, sample = member_key, {}
    sample[extension.lower()] = tar.extractfile(member).read()
  if sample:
    yield key, sample


def _webdataset_caption(sample: dict[str, bytes]) -> str:
  if "txt" in sample:
    try:
      return _check_caption(sample["txt"].decode("utf-8"))
    except UnicodeDecodeError as e:
      raise issues.SkipRecord(issues.CAPTION_UNDECODABLE, str(e)) from e
  if "json" in sample:
    try:
      return _check_caption(json.loads(sample["json"]).get("caption"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
      raise issues.SkipRecord(issues.CAPTION_UNDECODABLE, str(e)) from e
  raise issues.SkipRecord(issues.CAPTION_EMPTY, "no .txt or .json")


def webdataset_records(tar_paths: Iterable[str], counter: issues.IssueCounter,
                       min_side: int = 2) -> Iterator[tuple[str, sources.Record]]:
  for tar_path in sorted(tar_paths):
    shard = os.path.splitext(os.path.basename(tar_path))[0]
    try:
      with tarfile.open(tar_path) as tar:
        for key, sample in _webdataset_samples(tar):
          try:
            caption = _webdataset_caption(sample)
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            if image is None:
              raise issues.SkipRecord(issues.IMAGE_MISSING, f"{key} has no image")
            conversions = _check_image(image, min_side)
          except issues.SkipRecord as e:
            counter[e.reason] += 1
            continue
          counter.update(conversions)
          yield f"{shard}/{key}", {"image": image, "caption": caption}
    except (tarfile.TarError, OSError):
      # A truncated or unreadable shard: what was read is kept, the rest counted once.
      counter[issues.ANNOTATION_UNREADABLE] += 1


def read_chat_meta(path: str) -> dict[str, dict]:
  """The meta JSON: {dataset name: {"root", "annotation", "repeat_time", "length", ...}}."""
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or not meta:
    raise ValueError(f"{path}: expected a JSON object of datasets.")
  for name, entry in meta.items():
    missing = [k for k in META_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
      raise ValueError(f"{path}: dataset {name!r} lacks {missing}.")
    if not float(entry.get("repeat_time", 1)) > 0:
      raise ValueError(f"{path}: dataset {name!r} has repeat_time <= 0.")
  return meta


def split_name(dataset_name: str) -> str:
  """A TFDS split name for a meta dataset name (letters, digits and underscores)."""
  return re.sub(r"\W", "_", dataset_name)


def _chat_turns(conversations) -> list[tuple[str, str]]:
  if not isinstance(conversations, list) or not all(
      isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
      for t in conversations):
    raise issues.SkipRecord(issues.CONVERSATION_MALFORMED, "not a list of {from, value}")
  return [(t["from"], t["value"]) for t in conversations]


def internvl_chat_records(entry: dict, counter: issues.IssueCounter,
                          min_side: int = 2) -> Iterator[tuple[str, sources.Record]]:
  """Records of one meta dataset; lines without "image" are text-only records."""
  for line_number, item in _json_lines(entry["annotation"], counter):
    try:
      image_path = item.get("image")
      if isinstance(image_path, list):
        if len(image_path) != 1:
          raise issues.SkipRecord(issues.MULTIPLE_IMAGES, f"{len(image_path)} images")
        image_path = image_path[0]
      if image_path is not None and not isinstance(image_path, str):
        raise issues.SkipRecord(issues.ANNOTATION_UNREADABLE, f"image is {image_path!r}")
      turns = _chat_turns(item.get("conversations"))
      templates.parse_conversation(turns, has_image=bool(image_path))
      image = _read_image(os.path.join(entry["root"], image_path)) if image_path else b""
      conversions = _check_image(image, min_side) if image_path else ()
    except issues.SkipRecord as e:
      counter[e.reason] += 1
      continue
    counter.update(conversions)
    yield f"{line_number:010d}", {
        "image": image,
        "conversations": [{"from": role, "value": text} for role, text in turns],
    }


def counted(records: Iterable[tuple[str, sources.Record]], written: dict[str, int],
            split: str) -> Iterator[tuple[str, sources.Record]]:
  """Passes records through, counting them into written[split]."""
  written.setdefault(split, 0)
  for record in records:
    written[split] += 1
    yield record
