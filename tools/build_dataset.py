"""Imports image-text data into TFDS ArrayRecord datasets that the pipelines read.

  python tools/build_dataset.py image-folder --images DIR --captions captions.jsonl --name NAME
  python tools/build_dataset.py webdataset --shards 'shards/*.tar' --name NAME
  python tools/build_dataset.py internvl-chat --meta meta.json --name NAME
  python tools/build_dataset.py demo [--image-size 64] [--seed 0]

Bad records are skipped; the report says how many records were written per split, how many
were skipped, by reason, and how many images are stored in a mode other than RGB (grayscale,
palette, CMYK, with alpha, ...), by mode: those are kept and read as RGB. An InternVL-Chat meta
file becomes one split per dataset, and the report gives the mixture weights (records x
repeat_time) to read them with.

The JSON report is all that is written to stdout (`json.loads` reads it); progress and logs go
to stderr.
"""

import argparse
import contextlib
import glob
import json
import os
import sys

from internvl_jax.data import demo
from internvl_jax.data import importers
from internvl_jax.data import issues
from internvl_jax.data import sources


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="format", required=True)

  def add(name, help_text):
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--data-dir", default=None,
                         help="TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    return command

  for name, help_text in (("image-folder", "a folder of images + a captions JSONL file"),
                          ("webdataset", "img2dataset WebDataset tar shards"),
                          ("internvl-chat", "an InternVL-Chat meta JSON")):
    command = add(name, help_text)
    command.add_argument("--name", required=True, help="TFDS dataset name (snake_case)")
    command.add_argument("--version", default="1.0.0")
    command.add_argument("--min-image-side", type=int, default=2)
    if name != "internvl-chat":
      command.add_argument("--split", default="train")
    if name == "image-folder":
      command.add_argument("--images", required=True, help="folder the image paths are relative to")
      command.add_argument("--captions", required=True, help="JSONL file, one object per image")
      command.add_argument("--image-key", default="image")
      command.add_argument("--caption-key", default="caption")
    elif name == "webdataset":
      command.add_argument("--shards", required=True, nargs="+", help="tar files or glob patterns")
    else:
      command.add_argument("--meta", required=True, help="meta JSON of datasets")
  command = add("demo", "the built-in synthetic shapes dataset and its tokenizer")
  command.add_argument("--image-size", type=int, default=64)
  command.add_argument("--image-format", choices=("png", "jpeg"), default="png")
  command.add_argument("--seed", type=int, default=0)
  command.add_argument("--train-size", type=int, default=20_000)
  command.add_argument("--eval-size", type=int, default=500)
  command.add_argument("--vocab-size", type=int, default=512)
  return parser.parse_args(argv)


def _import(args: argparse.Namespace) -> dict:
  counter = issues.IssueCounter()
  written: dict[str, int] = {}
  if args.format == "image-folder":
    splits = {args.split: lambda: importers.counted(importers.image_folder_records(
        args.images, args.captions, counter, args.image_key, args.caption_key,
        args.min_image_side), written, args.split)}
    features = sources.pair_features()
  elif args.format == "webdataset":
    paths = sorted({p for pattern in args.shards for p in glob.glob(pattern)})
    if not paths:
      raise SystemExit(f"No tar shards match {args.shards}.")
    splits = {args.split: lambda: importers.counted(importers.webdataset_records(
        paths, counter, args.min_image_side), written, args.split)}
    features = sources.pair_features()
  else:
    meta = importers.read_chat_meta(args.meta)
    splits = {
        importers.split_name(name): (
            lambda entry=entry, split=importers.split_name(name): importers.counted(
                importers.internvl_chat_records(entry, counter, args.min_image_side),
                written, split))
        for name, entry in meta.items()
    }
    features = sources.chat_features()
  tfds_name = sources.write_dataset(args.name, splits, features, data_dir=args.data_dir,
                                    version=args.version)
  report = {"dataset": tfds_name, "written": written, "skipped": counter.skipped(),
            "skipped_by_reason": counter.skipped_by_reason(),
            "converted_by_mode": counter.converted_by_mode()}
  if args.format == "internvl-chat":
    report["mixture_weights"] = {
        importers.split_name(name): written.get(importers.split_name(name), 0) *
        float(entry.get("repeat_time", 1)) for name, entry in meta.items()}
  return report


@contextlib.contextmanager
def _stdout_to_stderr():
  """Sends everything written to stdout to stderr, at the file-descriptor level too: TFDS,
  tqdm and native code may write to fd 1 directly, past `sys.stdout`."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 1)
    os.close(saved)


def main(argv: list[str]) -> dict:
  args = _parse(argv)
  with _stdout_to_stderr():
    if args.format == "demo":
      report = {
          "dataset": demo.ensure_dataset(args.image_size, args.seed, args.train_size,
                                         args.eval_size, args.image_format, args.data_dir),
          "tokenizer": demo.ensure_tokenizer(args.seed, args.train_size, args.vocab_size,
                                             args.data_dir),
      }
    else:
      report = _import(args)
  print(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
