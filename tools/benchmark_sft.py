"""One InternVL-Chat SFT train step (forward + backward) on a packed row, JAX against transformers'
`InternVLForConditionalGeneration` loaded from the same weights, on the same device.

  python tools/benchmark.py sft [--vision-layers 2] [--llm-layers 2] [--row 512] [--samples 3]
  python tools/benchmark.py sft --platform gpu --dtype bfloat16 --attention xla,cudnn \
      --vision-layers 24 --llm-layers 22 --row 8192 --samples 24

The model is InternViT-300M's blocks at 224 px (256 patches, pixel-shuffled to 64 image tokens)
and TinyLlama-1.1B's decoder blocks (width 2048, grouped-query attention) with its 32,000-token
vocabulary, each cut to a few layers. The row packs `--samples` conversations, each one tile and
text, that fill it exactly. As in stage 3, the LLM and the projector train and InternViT is
frozen (forward only). JAX runs the stage-3 loss of the trainer
(`ChatStage`: segment ids, chunked cross-entropy); transformers takes the packed row as position
ids that restart at each sample with no attention mask, from which it builds the block-diagonal
causal mask for its sdpa attention (flash-attn's varlen kernels do not run on the CPU). Both
losses are printed: they agree when the two compute the same thing. A half-precision --dtype is
the models' compute dtype, float32 params, under autocast on the PyTorch side. The op-time
profile is the CPU's only.
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import flops
from internvl_jax.config import AttentionConfig, ChatConfig, llama_preset, vision_preset
from internvl_jax.convert.pytorch import export_pytorch
from internvl_jax.data.tokenizer import IGNORE_LABEL
from internvl_jax.models import chat, llama
from internvl_jax.stages.sft import ChatStage

import benchmark_compare
import benchmark_profile

IMAGE_SIZE = 224


def chat_config(vision_layers: int, llm_layers: int, dtype: str = "float32",
                attention: str = "auto") -> ChatConfig:
  kernel = AttentionConfig(implementation=attention)
  llm = llama_preset("tinyllama-1.1b", num_layers=llm_layers, dtype=dtype, attention=kernel)
  return ChatConfig(vision=vision_preset("300m-448", num_layers=vision_layers,
                                         image_size=IMAGE_SIZE, dtype=dtype, attention=kernel),
                    llm=llm, variant="v1.5", image_size=IMAGE_SIZE,
                    image_context_id=llm.vocab_size - 1)


def packed_row(config: ChatConfig, row: int, samples: int, seed: int = 0) -> dict:
  """One row of `samples` conversations, each [BOS, image tokens, prompt, answer], filling `row`
  tokens; labels on the answers only; segment ids 1, 2, ... per sample."""
  rng = np.random.default_rng(seed)
  image_tokens = config.num_image_tokens
  lengths = np.full(samples, row // samples)
  lengths[: row % samples] += 1
  if lengths.min() < image_tokens + 4:
    raise ValueError(f"A row of {row} tokens cannot hold {samples} samples of {image_tokens} "
                     "image tokens and some text each.")
  tokens, labels, segments = [], [], []
  for sample, length in enumerate(lengths, start=1):
    text = rng.integers(3, config.llm.vocab_size - 16, size=length - 1 - image_tokens)
    prompt = len(text) // 2
    tokens += [config.llm.bos_id, *[config.image_context_id] * image_tokens, *text]
    labels += [IGNORE_LABEL] * (1 + image_tokens + prompt) + list(text[prompt:])
    segments += [sample] * length
  tiles = rng.normal(size=(1, samples, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return {"tiles": tiles, "tile_count": np.array([samples], np.int32),
          "tokens": np.array([tokens], np.int32), "labels": np.array([labels], np.int32),
          "segment_ids": np.array([segments], np.int32), "valid": np.ones((1,), bool)}


def _jax_step(stage: ChatStage, params, batch):
  """The compiled step of the trained params (all but the frozen vision model's), and those."""
  frozen = {"vision_model": params["vision_model"]}
  trained = {key: value for key, value in params.items() if key not in frozen}

  def loss(trained, batch):
    params = trained | frozen
    return stage.loss(params, stage.encode(params, batch, None), batch)[0]

  step = jax.jit(jax.value_and_grad(loss)).lower(trained, batch).compile()
  print(f"jax loss {float(step(trained, batch)[0]):.6f}")
  return step, trained


def _torch_step(config: ChatConfig, params, batch, directory: str, device: str):
  import torch
  import transformers

  export_pytorch(config, params, directory, layout="transformers")
  model = transformers.InternVLForConditionalGeneration.from_pretrained(
      directory, attn_implementation="sdpa").to(device).train()
  model.model.vision_tower.requires_grad_(False)
  positions = np.array(llama.segment_positions(jnp.asarray(batch["segment_ids"])))
  inputs = {"input_ids": torch.from_numpy(batch["tokens"]).long(),
            "labels": torch.from_numpy(batch["labels"]).long(),
            "position_ids": torch.from_numpy(positions).long(),
            "pixel_values": torch.from_numpy(batch["tiles"][0].transpose(0, 3, 1, 2).copy())}
  inputs = {key: value.to(device) for key, value in inputs.items()}
  step = benchmark_compare.torch_train_step(
      model, lambda: model(**inputs, use_cache=False).loss, device, config.llm.dtype)
  print(f"transformers loss {step().item():.6f}")
  return step


def main(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py sft")
  parser.add_argument("--vision-layers", type=int, default=2)
  parser.add_argument("--llm-layers", type=int, default=2)
  parser.add_argument("--row", type=int, default=512, help="tokens in the packed row")
  parser.add_argument("--samples", type=int, default=3, help="conversations (one tile each)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--platform", default="cpu", help="JAX's platform: cpu or gpu")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention", default="auto",
                      help="attention implementations, comma-separated: a JAX runner each")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", args.platform)
  on_cpu = args.platform == "cpu"

  implementations = args.attention.split(",")
  configs = {name: chat_config(args.vision_layers, args.llm_layers, args.dtype, name)
             for name in implementations}
  config = configs[implementations[0]]
  batch = packed_row(config, args.row, args.samples)
  flops_per_step = flops.chat_training_flops(config, args.row, args.samples)
  if on_cpu:
    benchmark_compare.describe_machine()
  peak = benchmark_compare.mfu_peak_tflops(jax.devices()[0], args.dtype, with_torch=True)
  print(f"InternVL-Chat: InternViT-300M blocks x{args.vision_layers} at {IMAGE_SIZE} px, "
        f"TinyLlama blocks x{args.llm_layers}, vocabulary {config.llm.vocab_size}; one packed "
        f"row of {args.row} tokens, {args.samples} samples of one tile; {args.dtype}; "
        f"{flops_per_step / 1e9:.1f} GFLOP per forward+backward step")

  params = jax.device_put(chat.init_params(config))
  jax_batch = {key: jnp.asarray(value) for key, value in batch.items()}
  runners, steps = {}, {}
  for name, variant in configs.items():
    # One loss block as wide as the vocabulary: a short row's logits fit, as PyTorch keeps them.
    stage = ChatStage(model=variant, max_len=args.row, pack_length=args.row,
                      pack_tiles=args.samples, loss_block_size=config.llm.vocab_size)
    label = "jax" if len(configs) == 1 else f"jax {name}"
    step, trained = steps[label] = _jax_step(stage, params, jax_batch)
    runners[label] = lambda step=step, trained=trained: jax.block_until_ready(
        step(trained, jax_batch))
  with tempfile.TemporaryDirectory() as directory:
    runners["transformers"] = _torch_step(config, params, batch, directory,
                                          "cpu" if on_cpu else "cuda")
  times = benchmark_compare.alternate(runners, args.steps)
  benchmark_compare.print_comparison(times, flops_per_step, peak, "tokens", args.row)
  if on_cpu:
    for label, (step, trained) in steps.items():
      benchmark_compare.print_breakdown(label, benchmark_profile.breakdown(step, trained,
                                                                           jax_batch))
