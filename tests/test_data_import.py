"""tools/build_dataset.py: each import format, with the skipped records counted by reason and
the images stored in other modes than RGB counted by mode."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import scripts
from internvl_jax.data import chat
from internvl_jax.data import config as config_lib
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import pipeline
from internvl_jax.data import sources
from internvl_jax.data import tokenizer as tokenizer_lib

build_dataset = scripts.load("tools/build_dataset.py")
train_tokenizer = scripts.load("tools/train_tokenizer.py")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def image(i: int, mode: str = "RGB") -> Image.Image:
  return Image.fromarray(np.full((10, 12, 3), 20 * i, np.uint8)).convert(mode)


def write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write(line if isinstance(line, str) else json.dumps(line))
      f.write("\n")


def read_all(name, split, data_dir):
  data = sources.open_source(config_lib.Source(name, split, data_dir=data_dir))
  return [data[i] for i in range(len(data))]


def test_image_folder_with_captions_jsonl(tmp_path):
  images = tmp_path / "images"
  (images / "sub").mkdir(parents=True)
  for i in range(4):
    (images / "sub" / f"{i}.png").write_bytes(encode(image(i)))
  (images / "gray.png").write_bytes(encode(image(5, "L")))
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  write_jsonl(tmp_path / "captions.jsonl", [
      *({"image": f"sub/{i}.png", "caption": f"picture {i}"} for i in range(4)),
      {"image": "gray.png", "caption": "gray"},
      {"image": "broken.jpg", "caption": "broken"},
      {"image": "missing.png", "caption": "missing"},
      {"image": "sub/0.png", "caption": "  "},
      "{not json",
      "",
  ])
  data_dir = str(tmp_path / "tfds")
  report = build_dataset.main(["image-folder", "--images", str(images), "--captions",
                               str(tmp_path / "captions.jsonl"), "--name", "folder_pairs",
                               "--data-dir", data_dir])
  assert report["written"] == {"train": 5}
  assert report["skipped_by_reason"] == {
      issues.IMAGE_UNDECODABLE: 1, issues.IMAGE_MISSING: 1, issues.CAPTION_EMPTY: 1,
      issues.ANNOTATION_UNREADABLE: 1}
  assert report["skipped"] == 4
  assert report["converted_by_mode"] == {"L": 1}
  records = read_all("folder_pairs", "train", data_dir)
  assert sorted(r["caption"] for r in records) == [b"gray"] + [f"picture {i}".encode()
                                                               for i in range(4)]
  assert all(Image.open(io.BytesIO(r["image"])).size == (12, 10) for r in records)


def test_command_line_imports_every_mode_and_writes_only_the_report_on_stdout(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  stored = {"RGB": "PNG", "L": "PNG", "CMYK": "JPEG", "P": "PNG", "RGBA": "PNG"}
  for i, (mode, fmt) in enumerate(stored.items()):
    (images / f"{mode}.{fmt.lower()}").write_bytes(encode(image(i + 1, mode), fmt))
  (images / "corrupt.png").write_bytes(encode(image(1))[:30])
  write_jsonl(tmp_path / "captions.jsonl", [
      *({"image": f"{mode}.{fmt.lower()}", "caption": mode} for mode, fmt in stored.items()),
      {"image": "corrupt.png", "caption": "corrupt"},
      {"image": "missing.png", "caption": "missing"},
  ])
  data_dir = str(tmp_path / "tfds")
  env = {**os.environ,
         "PYTHONPATH": os.pathsep.join(filter(None, [scripts.REPO, os.environ.get("PYTHONPATH")]))}
  result = subprocess.run(
      [sys.executable, os.path.join(scripts.REPO, "tools", "build_dataset.py"), "image-folder",
       "--images", str(images), "--captions", str(tmp_path / "captions.jsonl"),
       "--name", "every_mode", "--data-dir", data_dir],
      capture_output=True, text=True, env=env, check=False)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["written"] == {"train": 5}
  assert report["skipped_by_reason"] == {issues.IMAGE_UNDECODABLE: 1, issues.IMAGE_MISSING: 1}
  assert report["converted_by_mode"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
  records = read_all("every_mode", "train", data_dir)
  assert sorted(r["caption"].decode() for r in records) == sorted(stored)


def add_member(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards(tmp_path):
  for shard in range(2):
    with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
      for i in range(3):
        key = f"{shard:05d}{i:04d}"
        add_member(tar, f"{key}.jpg", encode(image(i), "JPEG"))
        add_member(tar, f"{key}.txt", f"shard {shard} image {i}".encode())
        add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
      add_member(tar, "json_only.jpg", encode(image(4), "JPEG"))
      add_member(tar, "json_only.json", json.dumps({"caption": f"from json {shard}"}).encode())
      add_member(tar, "no_image.txt", b"lonely caption")
      add_member(tar, "corrupt.jpg", encode(image(1), "JPEG")[:60])
      add_member(tar, "corrupt.txt", b"corrupt")
      add_member(tar, "bad_text.png", encode(image(2)))
      add_member(tar, "bad_text.txt", b"\xff\xfe")
  data_dir = str(tmp_path / "tfds")
  report = build_dataset.main(["webdataset", "--shards", str(tmp_path / "*.tar"), "--name",
                               "web_pairs", "--split", "validation", "--data-dir", data_dir])
  assert report["written"] == {"validation": 8}
  assert report["skipped_by_reason"] == {issues.IMAGE_MISSING: 2, issues.IMAGE_UNDECODABLE: 2,
                                         issues.CAPTION_UNDECODABLE: 2}
  captions = sorted(r["caption"].decode() for r in read_all("web_pairs", "validation", data_dir))
  assert captions == sorted([f"shard {s} image {i}" for s in range(2) for i in range(3)] +
                            ["from json 0", "from json 1"])


def test_internvl_chat_meta_and_its_pipeline(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for i, mode in enumerate(["RGB", "L", "L"]):  # 20x10: a 2x1 grid of tiles plus the thumbnail
    picture = Image.fromarray(np.full((10, 20, 3), 9, np.uint8)).convert(mode)
    (root / f"{i}.jpg").write_bytes(encode(picture, "JPEG"))

  def turns(question, answer="A circle."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

  write_jsonl(tmp_path / "vqa.jsonl", [
      {"image": "0.jpg", "conversations": turns("<image>\nWhat is it?")},
      {"image": ["1.jpg"], "conversations": turns("What is this?\n<image>")},
      {"image": "2.jpg", "conversations": turns("No placeholder?")},
      {"image": "2.jpg", "conversations": turns("<image> twice <image>")},
      {"image": "2.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
      {"image": "absent.jpg", "conversations": turns("<image>\nWhere?")},
      {"image": ["0.jpg", "1.jpg"], "conversations": turns("<image>\n<image>")},
      {"image": "0.jpg", "conversations": "not a list"},
  ])
  write_jsonl(tmp_path / "text.jsonl", [
      {"conversations": turns("Say hi.", "Hi.")},
      {"conversations": turns("Say bye.", "Bye.")},
  ])
  meta = {
      "tiny-vqa": {"root": str(root), "annotation": str(tmp_path / "vqa.jsonl"),
                   "repeat_time": 2, "length": 8},
      "text only": {"root": "", "annotation": str(tmp_path / "text.jsonl"),
                    "repeat_time": 0.5, "length": 2},
  }
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  data_dir = str(tmp_path / "tfds")
  report = build_dataset.main(["internvl-chat", "--meta", str(tmp_path / "meta.json"),
                               "--name", "tiny_chat", "--data-dir", data_dir])
  assert report["written"] == {"tiny_vqa": 2, "text_only": 2}
  assert report["skipped_by_reason"] == {
      issues.CONVERSATION_NO_IMAGE_PLACEHOLDER: 1,
      issues.CONVERSATION_MULTIPLE_IMAGE_PLACEHOLDERS: 1,
      issues.CONVERSATION_NO_ASSISTANT_TURN: 1, issues.IMAGE_MISSING: 1,
      issues.MULTIPLE_IMAGES: 1, issues.CONVERSATION_MALFORMED: 1}
  assert report["converted_by_mode"] == {"L": 1}  # 2.jpg's records are all skipped
  assert report["mixture_weights"] == {"tiny_vqa": 4.0, "text_only": 1.0}

  tokenizer_path = train_tokenizer.main(["--dataset", "tiny_chat", "--split", "tiny_vqa",
                                         "--data-dir", data_dir, "--vocab-size", "300",
                                         "--output", str(tmp_path / "chat.model")])
  loader = config_lib.LoaderConfig(
      sources=tuple(config_lib.Source("tiny_chat", split, weight, data_dir)
                    for split, weight in report["mixture_weights"].items()),
      global_batch_size=4, shard_index=0, shard_count=1)
  config = config_lib.ChatDataConfig(loader=loader, tokenizer_path=tokenizer_path,
                                     template="internlm2-chat", system_message="", tile_size=8,
                                     image_tokens_per_tile=2, max_tiles=2, max_len=64)
  batch = next(pipeline.chat_pipeline(config))
  assert set(batch["tile_count"].tolist()) <= {0, 3} and 3 in batch["tile_count"]
  text_only = batch["tile_count"] == 0
  assert not batch["tiles"][text_only].any()
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  answers = [tokenizer.decode([t for t in row if t >= 0 and t < tokenizer.vocab_size])
             for row in batch["labels"]]
  assert all(a in ("A circle.", "Hi.", "Bye.") for a in answers)
  processor = chat.ChatProcessor(config, chat.load_chat_tokenizer(tokenizer_path, config.template))
  reasons = [reason for record in read_all("tiny_chat", "tiny_vqa", data_dir)
             for reason in processor.map(record).reasons]
  assert reasons == [issues.converted_from("L")]  # what training counts for the gray 1.jpg


def test_demo_command_builds_dataset_and_tokenizer(tmp_path):
  report = build_dataset.main(["demo", "--image-size", "8", "--train-size", "20",
                               "--eval-size", "4", "--vocab-size", "400",
                               "--data-dir", str(tmp_path)])
  config = f"v{demo.VERSION}_8px_png_seed0_train20"
  assert report["dataset"] == f"internvl_demo_shapes/{config}"
  assert tokenizer_lib.Tokenizer.load(report["tokenizer"]).vocab_size <= 400
  with pytest.raises(FileExistsError):
    sources.write_dataset("internvl_demo_shapes", {"train": lambda: iter(())},
                          sources.pair_features(), str(tmp_path),
                          config=config)
