"""Trains a small SentencePiece model (LLaMA id layout) on a dataset's captions and conversations.

  python tools/train_tokenizer.py --dataset NAME --split train --vocab-size 512 --output tok.model
  python tools/train_tokenizer.py --demo   # the demo tokenizer, cached next to the demo data

The special tokens of the chat variants are not trained in; the pipelines append them to any
model (this one or a real LLaMA tokenizer.model) the same way.
"""

import argparse
import sys
from collections.abc import Iterator

from internvl_jax.data import config as config_lib
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import tokenizer as tokenizer_lib

PROMPT_TEXTS = ("summarize:", "English caption:")


def dataset_texts(source: config_lib.Source, undecodable: issues.IssueCounter) -> Iterator[str]:
  """Prompt prefixes, then each record's caption ("summarize:" + caption) and turns."""
  yield from PROMPT_TEXTS
  data = sources.open_source(source)
  for index in range(len(data)):
    record = data[index]
    try:
      if "caption" in record:
        yield "summarize:" + sources.decode_text(record["caption"], issues.CAPTION_UNDECODABLE)
      if "conversations" in record:
        for value in record["conversations"]["value"]:
          yield sources.decode_text(value, issues.CONVERSATION_MALFORMED)
    except issues.SkipRecord as e:
      undecodable[e.reason] += 1


def main(argv: list[str]) -> str:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--demo", action="store_true", help="train the demo tokenizer")
  parser.add_argument("--dataset", help="TFDS dataset name")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--vocab-size", type=int, default=512)
  parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
  parser.add_argument("--output", help="where to write the .model file")
  parser.add_argument("--seed", type=int, default=0, help="demo data seed")
  parser.add_argument("--train-size", type=int, default=20_000, help="demo train split size")
  args = parser.parse_args(argv)
  if args.demo:
    path = demo.ensure_tokenizer(args.seed, args.train_size, args.vocab_size, args.data_dir)
  else:
    if not args.dataset or not args.output:
      parser.error("--dataset and --output are required without --demo")
    skipped = issues.IssueCounter()
    source = config_lib.Source(args.dataset, args.split, data_dir=args.data_dir)
    model = tokenizer_lib.train_sentencepiece(dataset_texts(source, skipped), args.vocab_size,
                                              args.model_type)
    with open(args.output, "wb") as f:
      f.write(model)
    path = args.output
    if skipped:
      print(f"Texts skipped (undecodable): {dict(skipped)}")
  print(f"Tokenizer: {path} ({tokenizer_lib.Tokenizer.load(path).vocab_size} pieces)")
  return path


if __name__ == "__main__":
  main(sys.argv[1:])
