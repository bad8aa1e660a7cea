"""Sequence packing's fill: the fraction of a batch's token slots that hold real tokens, with and
without packing (`data/packing.py`), through the pipelines' own stages.

  python tools/benchmark.py packing [--conversations 4000]

Three cases:
  * stage 2's ITG captions on the demo data (the stage-2 "demo" preset, captions of up to 32
    tokens), read by its pair pipeline, packed --itg-pack-slots pairs to a row of
    --itg-pack-length caption tokens; with the analytic model FLOPs per pair (`flops`), packed
    at the measured pairs per row against unpacked;
  * the demo conversations (stage 3's "demo" preset: one 64-token image, a vicuna_v1 round), read
    from the demo dataset by its chat pipeline, packed into rows of --demo-pack-length tokens
    and --demo-pack-tiles tiles;
  * a synthetic length distribution shaped like LLaVA-Mix-665K's as InternVL fine-tunes on it
    (one 448-px tile of 256 image tokens, <img> and </img>), at the official max_packed_tokens
    8192, num_images_expected 40 and max_buffer_size 20, and max_seq_length 4096. Synthetic, not
    measured on the data: 94% are single-image conversations (the VQA, captioning, grounding and
    LLaVA-Instruct parts) whose text is log-normal with median 120 tokens (sigma 0.8): a few
    hundred tokens in all, with a long tail; 6% are text-only (the 40K ShareGPT conversations),
    log-normal with median 700 tokens (sigma 0.9), cut at max_seq_length as the official
    tokenization truncates. The shares follow LLaVA-1.5's data table; the lengths are a choice.

Unpacked rows are counted two ways: padded to the longest conversation of each per-device
micro-batch of --micro-batch, in data order, as the official non-packed collator
(`concat_pad_data_collator`) pads without `group_by_length`; and padded to max_len, as this
project's unpacked pipeline does (static shapes). The last line printed compares packing with the
official padding on the LLaVA-shaped case.
"""

import argparse
import dataclasses
import importlib.util
import os

import grain
import numpy as np

from internvl_jax import flops
from internvl_jax.data import config as config_lib
from internvl_jax.data import issues
from internvl_jax.data import packing
from internvl_jax.data import pipeline
from internvl_jax.train import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The LLaVA-shaped case (see the module docstring).
IMAGE_TOKENS = 256 + 2
IMAGE_SHARE = 0.94
IMAGE_TEXT_MEDIAN, IMAGE_TEXT_SIGMA = 120, 0.8
TEXT_ONLY_MEDIAN, TEXT_ONLY_SIGMA = 700, 0.9
LLAVA_MAX_LEN = 4096
LLAVA_PACKING = packing.Packing(pack_length=8192, pack_tiles=40, buffer_size=20)


def _parse(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py packing", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--conversations", type=int, default=4000, help="per case")
  parser.add_argument("--micro-batch", type=int, default=4,
                      help="conversations per unpacked per-device batch (official scripts: 4)")
  parser.add_argument("--demo-pack-length", type=int, default=1024)
  parser.add_argument("--demo-pack-tiles", type=int, default=16)
  parser.add_argument("--itg-pack-length", type=int, default=128)
  parser.add_argument("--itg-pack-slots", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def llava_shaped_lengths(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, tiles) of `count` synthetic conversations (see the module docstring)."""
  rng = np.random.default_rng(seed)
  with_image = rng.random(count) < IMAGE_SHARE
  image_text = rng.lognormal(np.log(IMAGE_TEXT_MEDIAN), IMAGE_TEXT_SIGMA, count)
  text_only = rng.lognormal(np.log(TEXT_ONLY_MEDIAN), TEXT_ONLY_SIGMA, count)
  tokens = np.where(with_image, IMAGE_TOKENS + image_text, text_only).astype(np.int64)
  return np.clip(tokens, 16, LLAVA_MAX_LEN), with_image.astype(np.int64)


def _synthetic_examples(tokens: np.ndarray, tiles: np.ndarray, max_len: int) -> grain.MapDataset:
  """The conversations as the chat pipeline's processed records; a tile is one pixel, since only
  the counts matter here."""

  def example(index):
    length = int(tokens[index])
    return index, issues.RecordOutcome({
        "tiles": np.zeros((1, 1, 1, 3), np.float32), "tile_count": np.int32(tiles[index]),
        "tokens": np.ones((max_len,), np.int32), "labels": np.ones((max_len,), np.int32),
        "token_mask": np.arange(max_len) < length})

  return grain.MapDataset.range(len(tokens)).map(example)


def packed_fraction(processed: grain.MapDataset, packing_config: packing.Packing) -> float:
  """Real tokens over the token slots of the packed rows of one pass over `processed`."""
  loader = config_lib.LoaderConfig(sources=(config_lib.Source("benchmark"),), global_batch_size=8,
                                   shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  real = slots = 0
  for batch in pipeline.batched(loader, processed, packing_config, packing.CONVERSATIONS):
    real += int(np.sum(batch["segment_ids"] > 0))
    slots += batch["segment_ids"].size
  return real / slots


def padded_fractions(lengths: np.ndarray, micro_batch: int, max_len: int) -> tuple[float, float]:
  """(padded to the longest of each micro-batch, padded to max_len), in data order."""
  longest = [max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
             for i in range(0, len(lengths), micro_batch)]
  return lengths.sum() / sum(longest), lengths.sum() / (len(lengths) * max_len)


def _demo_config(experiment: str):
  spec = importlib.util.spec_from_file_location(
      experiment, os.path.join(REPO, "experiments", f"{experiment}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


def itg_case(args) -> tuple[float, float, float, float]:
  """(packed fill, unpacked fill, pairs per packed row, packed over unpacked model FLOPs per
  pair) of the ITG captions of the first pairs of the stage-2 demo."""
  config = _demo_config("stage2_generative")
  stage = config.train.stage
  unpacked, lengths = inputs.pair_batches(config), []
  while len(lengths) < args.conversations:
    lengths.extend(int(n) for n in np.sum(next(unpacked)["itg_text"] > 0, axis=1))
  length, slots = args.itg_pack_length, args.itg_pack_slots
  packed_config = config.replace(
      train=config.train.replace(stage=dataclasses.replace(stage, pack_length=length,
                                                           pack_tiles=slots)),
      data=dataclasses.replace(config.data, pack_length=length, pack_tiles=slots))
  packed, pairs, rows, real, token_slots = inputs.pair_batches(packed_config), 0, 0, 0, 0
  while pairs < args.conversations:
    batch = next(packed)
    pairs, rows = pairs + int(batch["slot_valid"].sum()), rows + len(batch["slot_valid"])
    real += int(np.sum(batch["itg_slots"] > 0))
    token_slots += batch["itg_slots"].size
  size = stage.input_size
  per_pair = flops.internvl_g_stage2_training_flops(stage.model, (size, size), stage.text_len,
                                                    stage.backbone_itc)
  per_row = packed_config.train.stage.flops_per_example()
  per_packed_pair = per_row * rows / pairs
  return (real / token_slots, sum(lengths[:args.conversations]) /
          (args.conversations * stage.text_len), pairs / rows, per_packed_pair / per_pair)


def demo_case(args) -> tuple[float, float, float]:
  """(packed, unpacked to the micro-batch's longest, unpacked to max_len) over the first
  conversations of the demo data, both read by the stage-3 demo's chat pipeline."""
  config = _demo_config("stage3_sft")
  max_len = config.train.stage.max_len
  lengths = []
  unpacked = inputs.chat_batches(config)
  while len(lengths) < args.conversations:
    lengths.extend(int(n) for n in next(unpacked)["token_mask"].sum(axis=1))
  lengths = np.array(lengths[:args.conversations])
  packed_config = config.replace(data=dataclasses.replace(
      config.data, pack_length=args.demo_pack_length, pack_tiles=args.demo_pack_tiles))
  packed, conversations, real, slots = inputs.chat_batches(packed_config), 0, 0, 0
  while conversations < args.conversations:
    segment_ids = next(packed)["segment_ids"]
    conversations += int(segment_ids.max(axis=1).sum())
    real, slots = real + int(np.sum(segment_ids > 0)), slots + segment_ids.size
  return (real / slots, *padded_fractions(lengths, args.micro_batch, max_len))


def main(argv):
  args = _parse(argv)
  itg_packed, itg_unpacked, pairs_per_row, flops_ratio = itg_case(args)
  print(f"stage-2 demo ITG captions ({args.conversations}): packed {args.itg_pack_slots} pairs to "
        f"a {args.itg_pack_length}-token row {itg_packed:.4f} ({pairs_per_row:.2f} pairs per row); "
        f"unpacked, padded to text_len {itg_unpacked:.4f}; model FLOPs per pair packed / "
        f"unpacked {flops_ratio:.3f}")
  demo_packed, demo_longest, demo_max_len = demo_case(args)
  print(f"demo conversations ({args.conversations}): packed into {args.demo_pack_length}-token "
        f"rows {demo_packed:.4f}; unpacked, padded to the micro-batch's longest {demo_longest:.4f}, "
        f"to max_len {demo_max_len:.4f}")
  tokens, tiles = llava_shaped_lengths(args.conversations, args.seed)
  packed = packed_fraction(_synthetic_examples(tokens, tiles, LLAVA_MAX_LEN), LLAVA_PACKING)
  longest, to_max_len = padded_fractions(tokens, args.micro_batch, LLAVA_MAX_LEN)
  print(f"LLaVA-shaped synthetic ({args.conversations}; tokens median {int(np.median(tokens))}, "
        f"mean {tokens.mean():.0f}, p99 {int(np.percentile(tokens, 99))}): unpacked padded to "
        f"max_len {LLAVA_MAX_LEN}: {to_max_len:.4f}")
  print(f"packed non-padding fraction: {packed:.4f} (unpacked: {longest:.4f})")
