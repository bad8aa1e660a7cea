"""Evaluates a checkpoint: zero-shot classification, image-text retrieval, captioning, chat.

  python tools/evaluate.py --checkpoint PATH --task zero_shot|retrieval|caption|chat [--task ...]
      [--data demo|demo:SPLIT|tfds:NAME[:SPLIT]] [--mode C|G] [--limit N] [--batch-size B]
      [--data-dir DIR] [--class-names FILE] [--chat-template NAME] [--output results.json]

PATH is anything `internvl_jax.load_pretrained` reads (an Orbax checkpoint written by
internvl_jax, a PyTorch directory). zero_shot and retrieval need InternVL-C or -G (--mode G:
InternVL-G's embeddings), caption InternVL-G, chat InternVL-Chat; all need the tokenizer.
--data demo builds the built-in demo shapes at the model's image size on first use. The metric
names are listed in `internvl_jax/evaluation/runner.py`.
"""

import argparse
import json
import sys
import time

from internvl_jax.convert.cli import cli_errors
from internvl_jax.data import templates
from internvl_jax.evaluation import MODES, TASKS, check_task, evaluate, format_table
from internvl_jax.pretrained import load_pretrained


def _class_names(path: str | None) -> tuple[str, ...] | None:
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"{path} lists no class names.")
  return names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
  parser.add_argument("--task", required=True, action="append", choices=TASKS,
                      help="task to run (repeatable)")
  parser.add_argument("--data", default="demo", help="demo, demo:SPLIT or tfds:NAME[:SPLIT]")
  parser.add_argument("--mode", default="C", choices=MODES,
                      help="InternVL-C or -G embeddings (zero_shot, retrieval)")
  parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--data-dir", default=None, help="TFDS data directory")
  parser.add_argument("--class-names", default=None,
                      help="file with one zero-shot class name per line, in label order")
  parser.add_argument("--chat-template", default="vicuna_v1", choices=sorted(templates.TEMPLATES))
  parser.add_argument("--output", default=None, help="write the results to this JSON file")
  args = parser.parse_args(argv)
  tasks = list(dict.fromkeys(args.task))
  results = {}
  with cli_errors():
    model = load_pretrained(args.checkpoint)
    for task in tasks:  # every task checked before any runs: a bad one fails fast
      check_task(model, task, args.mode)
    class_names = _class_names(args.class_names)
    for task in tasks:
      start = time.perf_counter()
      results.update(evaluate(model, task, args.data, limit=args.limit,
                              batch_size=args.batch_size, mode=args.mode, data_dir=args.data_dir,
                              class_names=class_names, chat_template=args.chat_template))
      print(f"{task}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
  print(format_table(results))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
