"""Benchmarks (not tests). Each prints its figures; BENCHMARKS.md records them with the command.

  python tools/benchmark.py vit --preset tiny --batch 8
      InternViT forward+backward: images/s, achieved FLOP/s and MFU, JAX against transformers'
      InternVLVisionModel of the same config on the same device, timed in turns, and the ratio.
      MFU is against the device's dense bfloat16 peak where `hardware.DEVICES` knows it, on the
      CPU against the better of XLA's and torch's float32 matmul measured in the same run;
      with --platform cpu also the JAX step's op time by category. --layers-as both times the
      scanned and the unrolled blocks, --attention xla,cudnn each attention, in the same turns.
  python tools/benchmark.py convert [--layers 5]
      Peak memory of the converters on a synthetic checkpoint (see tools/benchmark_convert.py).
  python tools/benchmark.py data --stage 1
      The input pipeline (see tools/benchmark_data.py).
  python tools/benchmark.py sft [--llm-layers 2]
      One InternVL-Chat SFT step on a packed row, JAX against transformers on the CPU (see
      tools/benchmark_sft.py).
  python tools/benchmark.py loss --vocab 151674 --tokens 8192 --width 64 --block 8192
      The next-token loss's forward+backward from the final hidden states: XLA's temporary memory
      with the full (tokens, vocab) logits and with `chunked_lm_example_losses`, and their times
      (--steps 0: memory only, compiled without running).
  python tools/benchmark.py packing [--conversations 4000]
      The fraction of token slots holding real tokens with and without sequence packing, on the
      demo conversations and a LLaVA-Mix-665K-shaped synthetic distribution (see
      tools/benchmark_packing.py).
"""

import argparse
import importlib
import itertools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import losses
from internvl_jax.config import DTYPES, AttentionConfig, vision_preset
from internvl_jax.convert.intern_vit_layouts import TRANSFORMERS, config_json
from internvl_jax.models.intern_vit import init_params
from internvl_jax.flops import training_flops, vit_forward_flops
from internvl_jax.models.intern_vit import InternViT

import benchmark_compare  # tools/, next to this file
import benchmark_profile


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def use_platform(name: str | None) -> None:
  """Pins JAX to one platform (before its backends start); the profiler needs the CPU backend
  alone, without accelerator plugins that failed to find their device."""
  if name:
    jax.config.update("jax_platforms", name)


def _jax_step(config, batch, image_size, params):
  pixels = jnp.asarray(np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)), jnp.float32)

  def loss(p):
    features = InternViT(config).apply({"params": p}, pixels).last_hidden_state
    return jnp.mean(features.astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  jax.block_until_ready(step(params))  # warm-up
  return step


def _torch_step(config, batch, image_size, device: str):
  """transformers' InternVLVisionModel of `config` on `device` ("cpu" or "cuda")."""
  import torch
  import transformers

  hf_config = transformers.InternVLVisionConfig(**{
      k: v for k, v in config_json(config, TRANSFORMERS).items() if k not in ("architectures", "model_type")})
  model = transformers.InternVLVisionModel(hf_config).to(device).train()
  pixels = torch.randn(batch, 3, image_size, image_size, device=device)
  step = benchmark_compare.torch_train_step(
      model, lambda: model(pixels).last_hidden_state.float().pow(2).mean(), device, config.dtype)
  step()  # warm-up
  return step


def benchmark_vit(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py vit")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image-size", type=int, help="default: the preset's")
  parser.add_argument("--layers", type=int, help="override the number of layers")
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--remat", default="none")
  parser.add_argument("--layers-as", choices=("scan", "unrolled", "both"), default="scan",
                      help="the blocks as the scan or as a Python loop (VisionConfig.scan_layers); "
                           "both: each, timed in the same turns")
  parser.add_argument("--attention", default="auto",
                      help="attention implementations (AttentionConfig), comma-separated: each "
                           "is a JAX runner of its own, e.g. xla,cudnn on a GPU")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--platform", help="pin JAX to this platform (cpu: needed for the profile)")
  parser.add_argument("--libraries", default="jax,transformers",
                      help="which sides run, comma-separated (one alone where both do not fit "
                           "the device's memory)")
  args = parser.parse_args(argv)
  use_platform(args.platform)
  libraries = set(args.libraries.split(","))

  overrides = {"dtype": args.dtype, "remat_policy": args.remat}
  if args.layers:
    overrides["num_layers"] = args.layers
  config = vision_preset(args.preset, **overrides)
  image_size = args.image_size or config.image_size
  flops_per_step = training_flops(vit_forward_flops(config, (image_size, image_size))) * args.batch
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}")
  if on_cpu:
    benchmark_compare.describe_machine()
  peak = benchmark_compare.mfu_peak_tflops(device, args.dtype, "transformers" in libraries)
  print(f"InternViT {args.preset} (layers {config.num_layers}, width {config.hidden_size}), "
        f"{image_size}px, batch {args.batch}, {args.dtype}, remat {args.remat}, layers as "
        f"{args.layers_as}, attention {args.attention}: {flops_per_step / 1e9:.1f} GFLOP per "
        "forward+backward step")

  loops = ("scan", "unrolled") if args.layers_as == "both" else (args.layers_as,)
  implementations = args.attention.split(",")
  jax_steps = {}
  if "jax" in libraries:
    # The variants share one copy of the params (InternViT-6B's float32 params are 24 GB).
    params = jax.device_put(init_params(config))
    for loop, implementation in itertools.product(loops, implementations):
      name = " ".join(["jax"] + ([loop] if len(loops) > 1 else []) +
                      ([implementation] if len(implementations) > 1 else []))
      variant = config.replace(scan_layers=loop == "scan",
                               attention=AttentionConfig(implementation=implementation))
      jax_steps[name] = _jax_step(variant, args.batch, image_size, params)
  runners = {name: lambda step=step: jax.block_until_ready(step(params))
             for name, step in jax_steps.items()}
  if "transformers" in libraries:
    runners["transformers"] = _torch_step(config, args.batch, image_size,
                                          "cpu" if on_cpu else "cuda")
  times = benchmark_compare.alternate(runners, args.steps)
  benchmark_compare.print_comparison(times, flops_per_step, peak, "images", args.batch)
  if jax.config.jax_platforms == "cpu":
    for name, step in jax_steps.items():
      benchmark_compare.print_breakdown(name, benchmark_profile.breakdown(step, params))


def benchmark_loss(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py loss")
  parser.add_argument("--vocab", type=int, default=151674)  # Qwen2's
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--block", type=int, default=8192)
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(1, args.tokens + 1, args.width)), DTYPES[args.dtype])
  head = jnp.asarray(0.02 * rng.normal(size=(args.width, args.vocab)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, args.vocab, size=(1, args.tokens + 1)), jnp.int32)
  full = lambda h, w: losses.lm_example_losses(
      jnp.einsum("blw,wv->blv", h, w.astype(h.dtype), preferred_element_type=jnp.float32),
      labels)[0][0]
  chunked = lambda h, w: losses.chunked_lm_example_losses(h, w, labels,
                                                          block_size=args.block)[0][0]
  print(f"{args.tokens} tokens, vocabulary {args.vocab}, width {args.width}, {args.dtype}, "
        f"block {args.block}, on {jax.devices()[0].device_kind}")
  print(f"{'loss':<10}{'temp GiB':>10}{'median s':>10}")
  for name, fn in (("full", full), ("chunked", chunked)):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(hidden, head).compile()
    temp = step.memory_analysis().temp_size_in_bytes / 2**30
    seconds = float("nan")
    if args.steps:
      jax.block_until_ready(step(hidden, head))
      seconds = statistics.median(
          _timed(lambda: jax.block_until_ready(step(hidden, head))) for _ in range(args.steps))
    print(f"{name:<10}{temp:>10.3f}{seconds:>10.4f}")


def main():
  # The other commands live in tools/benchmark_NAME.py, imported when asked for: the data ones
  # need grain and TFDS, which a GPU host timing the models may lack.
  commands = {"vit": benchmark_vit, "loss": benchmark_loss}
  modules = ("convert", "data", "packing", "sft")
  if len(sys.argv) < 2 or sys.argv[1] not in (*commands, *modules):
    print(__doc__)
    sys.exit(2)
  name = sys.argv[1]
  command = commands.get(name) or importlib.import_module(f"benchmark_{name}").main
  command(sys.argv[2:])


if __name__ == "__main__":
  main()
