"""Input pipeline throughput: images/s, and per CPU core, of a stage's training pipeline.

  python tools/benchmark.py data --stage 1 --workers 2 --image-size 224 --batch 64 --seconds 30

Reads the demo dataset stored as JPEGs of --source-size pixels (built on first use in
--data-dir), so the figure covers JPEG decoding, random-resized crop, bicubic resize,
normalization, tokenization and batching, as a real run does.
"""

import argparse
import os
import sys
import time

from internvl_jax.data import config as config_lib
from internvl_jax.data import demo
from internvl_jax.data import pipeline


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=1)
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
  parser.add_argument("--image-size", type=int, default=224, help="output size (tile size, stage 3)")
  parser.add_argument("--batch", type=int, default=64, help="batch size of this process")
  parser.add_argument("--seconds", type=float, default=20.0, help="measuring time after warm-up")
  parser.add_argument("--source-size", type=int, default=320, help="stored image side")
  parser.add_argument("--records", type=int, default=2000, help="demo train records")
  parser.add_argument("--data-dir", default=None, help="TFDS data directory for the demo data")
  return parser.parse_args(argv)


def _iterator(args: argparse.Namespace) -> pipeline.DataIterator:
  name = demo.ensure_dataset(args.source_size, seed=0, train_size=args.records, eval_size=16,
                             image_format="jpeg", data_dir=args.data_dir)
  tokenizer_path = demo.ensure_tokenizer(seed=0, train_size=args.records, data_dir=args.data_dir)
  loader = config_lib.LoaderConfig(
      sources=(config_lib.Source(name, data_dir=args.data_dir),), global_batch_size=args.batch,
      worker_count=args.workers, shard_index=0, shard_count=1)
  if args.stage == 3:
    return pipeline.chat_pipeline(config_lib.ChatDataConfig(
        loader=loader, tokenizer_path=tokenizer_path, template="internlm2-chat",
        tile_size=args.image_size, max_len=8192))
  return pipeline.pair_pipeline(config_lib.PairDataConfig(
      loader=loader, tokenizer_path=tokenizer_path, image_size=args.image_size, flip=True,
      itm_negatives="batch_hard" if args.stage == 2 else "none", itg=args.stage == 2))


def main(argv: list[str]) -> float:
  args = _parse(argv)
  iterator = _iterator(args)
  for _ in range(2):  # worker start-up and first reads
    next(iterator)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    images += len(next(iterator)["valid"])
  elapsed = time.perf_counter() - start
  iterator.close()
  rate = images / elapsed
  # Reader threads and workers may use every CPU this process may run on; pin the process
  # (taskset -c 0 ...) to measure one core.
  cores = len(os.sched_getaffinity(0))
  print(f"stage {args.stage} data pipeline, {args.image_size} px, batch {args.batch}, "
        f"{args.workers} workers, {cores} CPU cores: {rate:.1f} images/s, "
        f"{rate / cores:.1f} images/s per core")
  return rate


if __name__ == "__main__":
  main(sys.argv[1:])
