"""Stage 3 (spec 4.4): supervised fine-tuning of InternVL-Chat on conversations.

  python experiments/stage3_sft.py                   # demo: CPU, from the stage-2 demo's ViT
  python experiments/stage3_sft.py --set "init=()"    # demo from a random ViT (no stage-2 run)
  python experiments/stage3_sft.py --preset paper-pretrain --init /ckpt/InternViT-6B-224px \
      --init /ckpt/vicuna-7b-v1.5 --set data.tokenizer=/ckpt/vicuna-7b-v1.5/tokenizer.model
  python experiments/stage3_sft.py --preset paper \
      --set data.tokenizer=/ckpt/vicuna-7b-v1.5/tokenizer.model   # from paper-pretrain's run
  python experiments/stage3_sft.py --preset demo-internlm2   # or demo-llama / -qwen2 / -phi3
  python experiments/stage3_sft.py --preset demo-lora         # LLM LoRA, all else frozen
  python experiments/stage3_sft.py --preset finetune-InternVL2_5-8B --init /ckpt/InternVL2_5-8B \
      --set data.tokenizer=/ckpt/InternVL2_5-8B/tokenizer.model   # or finetune-...-lora
  python experiments/stage3_sft.py --preset demo --set train.stage.pack_length=640 \
      --set train.stage.pack_tiles=8 --set data.pack_length=640 --set data.pack_tiles=8 \
      --set train.stage.loss_reduction=square   # packed rows, a batch of 32 rows

"demo": InternVL-Chat v1.0-style (layer features, MLP projector, no pixel shuffle, one 64-px
tile) on the stage-2 demo's tiny InternViT, frozen, and a tiny LLaMA trained from scratch with
the projector (no pretrained LLM exists offline), on the built-in shapes conversations in the
vicuna_v1 template; evaluates exact match of greedy answers on the test split at the end.
"gpu": InternViT-300M-448 (pixel shuffle, dynamic tiling) + a TinyLlama-1.1B-shaped LLM on one
GPU, bfloat16, one epoch of LLaVA-Mix-665K (built with `tools/build_dataset.py internvl-chat`);
`--init` the ViT and a LLaMA checkpoint of that shape (e.g. TinyLlama), as for "paper-pretrain".
"paper-pretrain" / "paper": the v1.0 recipe (LLaVA-1.5's) in two steps: InternViT-6B-224px run
at 336 px (layer -4, frozen) + Vicuna-7B v1.5; step 1 trains the MLP alone on LGS-558K in the
"plain" template (lr 1e-3, batch 256), step 2 the MLP and the LLM on LLaVA-Mix-665K in
vicuna_v1 (lr 2e-5, batch 128); each one epoch, AdamW without weight decay, warm-up 3% of the
steps, cosine. Step 1 takes the ViT and the LLM from two `--init`s; step 2 starts from step 1.
"finetune-CHECKPOINT" / "finetune-CHECKPOINT-lora": the official 2nd-stage fine-tune of a released
checkpoint (chat spec 6.2), from its converted checkpoint; the -lora variants train LLM LoRA
adapters (rank 16, alpha 32) alone, and the workdir loads and exports with them merged.
"demo-FAMILY" / "demo-lora": a tiny chat model of each LLM family fine-tuned on the demo
conversations in its template for 40 steps on CPU.
"""

import dataclasses
import functools
import math

from internvl_jax import sharding
from internvl_jax.config import (ChatConfig, LoraConfig, RopeScaling, chat_preset,
                                 internvl_preset, llama_preset, vision_preset)
from internvl_jax.data import demo, templates
from internvl_jax.data.config import Source
from internvl_jax.data.tokenizer import IMAGE_CONTEXT, IMAGE_TOKENS
from internvl_jax.optim import OptimizerConfig
from internvl_jax.stages.sft import PROJECTOR_AND_LLM_PARAMS, PROJECTOR_PARAMS, ChatStage, Freeze
from internvl_jax.train import cli, inputs
from internvl_jax.train import config as train_config

# The demo tokenizer's 512 pieces and <img>, </img>, <IMG_CONTEXT> (vicuna_v1 adds no markers).
_DEMO_TOKENIZER = demo.DemoTokenizer(vocab_size=512)
_DEMO_VOCAB = _DEMO_TOKENIZER.vocab_size + 3


# LLaVA-1.5's AdamW, without weight decay; presets set the lr, schedule and what trains.
OPTIMIZER = OptimizerConfig(b1=0.9, b2=0.999, weight_decay=0.0)


def demo_config() -> train_config.ExperimentConfig:
  llm = llama_preset("tiny", vocab_size=_DEMO_VOCAB, hidden_size=128, mlp_dim=352,
                     max_positions=256)
  # The stage-1/2 demo's vision tower, so it warm-starts. Its last block's tokens (v1.0 takes
  # layer -4 of 48): the demo ViT has two blocks, and stage 1 trained the last one for the image.
  model = ChatConfig(vision=internvl_preset("demo").vision, llm=llm, variant="v1.0",
                     image_size=64, select_layer=-1, image_context_id=_DEMO_VOCAB - 1)
  steps = 600  # answers about position (9 places) are learnt last
  train = train_config.TrainConfig(
      # 64 image tokens + the vicuna_v1 system prompt + one round: at most ~150 tokens.
      stage=ChatStage(model, max_len=160, template="vicuna_v1"),
      optimizer=OPTIMIZER.replace(learning_rate=2e-3, b2=0.98, warmup_steps=20, total_steps=steps,
                                  trainable=(PROJECTOR_AND_LLM_PARAMS,)),
      global_batch_size=32, mesh=sharding.MeshConfig(data=-1), log_every=20,
      checkpoint_every=100)
  # 125 test images, one question each: about 100 with one right answer (what shape / colour /
  # where / which background; "Describe the image." has several).
  evaluation = train_config.EvalConfig(every=steps, tasks=("chat",), data="demo", limit=125)
  data = train_config.DataConfig(sources=(demo.DemoSource(image_size=model.image_size),),
                                 tokenizer=_DEMO_TOKENIZER)
  return train_config.ExperimentConfig(train=train, data=data, eval=evaluation,
                                       init=("runs/stage2_generative",))


# Spec 4.4(a): the LLaVA-1.5 data, as TFDS datasets built with tools/build_dataset.py
# internvl-chat under these names; Vicuna's tokenizer comes with --set data.tokenizer=.
_PRETRAIN_RECORDS, _SFT_RECORDS = 558_128, 665_298


# The LLM's q/k/v and output projections of rows of thousands of tokens go to host memory in the
# forward pass and come back for the backward (models/remat.py): the backward recomputes only
# attention and the MLP, for little more HBM than full remat.
_LLM_REMAT = "offload_dot_except_mlp"


def _one_epoch(records: int, batch: int, learning_rate: float, **changes) -> OptimizerConfig:
  """Warm-up 3% of one epoch's steps, then cosine (HF Trainer's step counts: partial final
  batch included, warm-up rounded up)."""
  steps = math.ceil(records / batch)
  return OPTIMIZER.replace(learning_rate=learning_rate, warmup_steps=math.ceil(0.03 * steps),
                           total_steps=steps, **changes)


def gpu_config() -> train_config.ExperimentConfig:
  """One GPU: InternViT-300M-448 (frozen; 256 tokens per tile after pixel shuffle, up to 4
  tiles + thumbnail) + a TinyLlama-1.1B-shaped LLM, bfloat16."""
  llm = llama_preset("tinyllama-1.1b", vocab_size=32000 + 3, dtype="bfloat16",
                     remat_policy="full", max_positions=2048)
  model = ChatConfig(
      vision=vision_preset("300m-448", dtype="bfloat16", remat_policy="full"), llm=llm,
      variant="v1.5", image_size=448, select_layer=-1, image_context_id=llm.vocab_size - 1)
  train = train_config.TrainConfig(
      stage=ChatStage(model, max_len=2048, template="vicuna_v1", max_tiles=4),
      optimizer=_one_epoch(_SFT_RECORDS, 128, 2e-5, trainable=(PROJECTOR_AND_LLM_PARAMS,)),
      global_batch_size=128, accum_steps=16, mesh=sharding.MeshConfig(data=-1), log_every=10,
      checkpoint_every=500)
  data = train_config.DataConfig(sources=(Source("llava_v1_5_mix665k"),), worker_count=8)
  return train_config.ExperimentConfig(train=train, data=data)


def paper_pretrain_config() -> train_config.ExperimentConfig:
  """Step 1: the MLP alone on LGS-558K, "plain" template, lr 1e-3, batch 256."""
  model = chat_preset(
      "v1.0-vicuna-7b",
      vision=vision_preset("6b-224", dtype="bfloat16", remat_policy="full"),
      llm=chat_preset("v1.0-vicuna-7b").llm.replace(dtype="bfloat16", remat_policy=_LLM_REMAT))
  train = train_config.TrainConfig(
      stage=ChatStage(model, max_len=2048, template="plain", train_llm=False),
      optimizer=_one_epoch(_PRETRAIN_RECORDS, 256, 1e-3, trainable=(PROJECTOR_PARAMS,)),
      global_batch_size=256, accum_steps=2, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=500)
  data = train_config.DataConfig(sources=(Source("blip_laion_cc_sbu_558k"),), worker_count=8)
  return train_config.ExperimentConfig(train=train, data=data)


def paper_config() -> train_config.ExperimentConfig:
  """Step 2: the MLP and the LLM on LLaVA-Mix-665K, vicuna_v1, lr 2e-5, batch 128."""
  config = paper_pretrain_config()
  stage = dataclasses.replace(config.train.stage, template="vicuna_v1", train_llm=True)
  train = config.train.replace(
      stage=stage, optimizer=_one_epoch(_SFT_RECORDS, 128, 2e-5, trainable=(PROJECTOR_AND_LLM_PARAMS,)),
      global_batch_size=128, accum_steps=1)
  data = train_config.DataConfig(sources=(Source("llava_v1_5_mix665k"),), worker_count=8)
  return config.replace(train=train, data=data, init=("runs/stage3_sft-paper-pretrain",))


# Chat spec 6.2, the official 2nd-stage fine-tunes of the released checkpoints: lr, weight decay,
# max_seq_length, max_dynamic_patch and gradient accumulation (per-device batch x GPUs x
# accumulation = 128). Their ViT drop path (0.1-0.4) is left out: the chat ViT runs without it.
_FINETUNES = {
    "Mini-InternVL-Chat-2B-V1-5": (4e-5, 0.01, 4096, 12, 4),
    "Mini-InternVL-Chat-4B-V1-5": (4e-5, 0.05, 4096, 12, 4),
    "InternVL-Chat-V1-5": (2e-5, 0.05, 4096, 12, 8),
    "InternVL2-2B": (4e-5, 0.01, 4096, 6, 4),
    "InternVL2-4B": (4e-5, 0.01, 4096, 6, 4),
    "InternVL2-8B": (4e-5, 0.05, 4096, 6, 4),
    "InternVL2-26B": (2e-5, 0.05, 4096, 6, 8),
    "InternVL2_5-1B": (4e-5, 0.01, 8192, 6, 4),
    "InternVL2_5-2B": (4e-5, 0.01, 8192, 6, 4),
    "InternVL2_5-4B": (4e-5, 0.01, 8192, 6, 4),
    "InternVL2_5-8B": (4e-5, 0.05, 8192, 6, 4),
    "InternVL2_5-26B": (2e-5, 0.05, 8192, 6, 8),
    "InternVL2_5-38B": (2e-5, 0.05, 8192, 6, 4),
    "InternVL3-1B": (1e-5, 0.05, 16384, 12, 4),
    "InternVL3-2B": (2e-5, 0.05, 16384, 12, 4),
    "InternVL3-8B": (2e-5, 0.05, 16384, 12, 4),
    "InternVL3-38B": (2e-5, 0.05, 16384, 12, 4),
}
# The `*_lora.sh` scripts (none for InternVL3): ViT, MLP and LLM frozen, LLM LoRA rank 16 (alpha
# 32), global batch 16 (2 GPUs x 4 x 2), otherwise the full fine-tune's numbers.
_LORA = LoraConfig(llm_rank=16)
_LORA_BATCH, _LORA_ACCUM = 16, 2


def finetune_config(name: str, use_lora: bool = False) -> train_config.ExperimentConfig:
  """The official 2nd-stage fine-tune of the released checkpoint `name`: `--init` its converted
  checkpoint (`tools/convert_from_pytorch.py`), whose config must be the preset's. The data is
  LLaVA-Mix-665K for one epoch; for other data set data.sources and the steps."""
  learning_rate, weight_decay, max_len, max_tiles, accum = _FINETUNES[name]
  model = chat_preset(name)
  model = model.replace(
      vision=model.vision.replace(dtype="bfloat16", remat_policy="full"),
      llm=model.llm.replace(dtype="bfloat16", remat_policy=_LLM_REMAT),
      lora=_LORA if use_lora else None)
  freeze = Freeze(vision=True, projector=use_lora, llm=use_lora)
  batch, accum = (_LORA_BATCH, _LORA_ACCUM) if use_lora else (128, accum)
  train = train_config.TrainConfig(
      stage=ChatStage(model, max_len=max_len, template=model.template, max_tiles=max_tiles),
      optimizer=_one_epoch(_SFT_RECORDS, batch, learning_rate, weight_decay=weight_decay,
                           **freeze.masks(model.lora)),
      global_batch_size=batch, accum_steps=accum, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=500)
  data = train_config.DataConfig(sources=(Source("llava_v1_5_mix665k"),), worker_count=8)
  return train_config.ExperimentConfig(train=train, data=data)


# Tiny chat models of each LLM family (chat spec 2), fine-tuned as the official recipe does (ViT
# frozen, MLP and LLM trained) on the demo conversations in the family's template: what differs
# is the LLM's config (RoPE scaling, q/k/v biases) and the template's special tokens.
_TINY_HEAD_FREQUENCIES = 16  # head_dim 128 / 4 heads / 2
_DEMO_FAMILIES = {
    "llama": ({}, "vicuna_v1"),
    # InternLM2's dynamic NTK keyed on the keys, beyond 64 positions (the demo rows are longer).
    "internlm2": ({"rope_base": 1e6, "rope_scaling": RopeScaling(
        "dynamic", 2.0, original_max_positions=64, length="keys")}, "internlm2-chat"),
    "qwen2": ({"rope_base": 1e6, "qkv_bias": True}, "internvl2_5"),
    "phi3": ({"rope_scaling": RopeScaling(
        "longrope", 4.0, original_max_positions=64,
        short_factor=(1.0,) * _TINY_HEAD_FREQUENCIES,
        long_factor=tuple(1.0 + i / 4 for i in range(_TINY_HEAD_FREQUENCIES)))}, "phi3-chat"),
}


def demo_family_config(family: str, lora_config: LoraConfig | None = None):
  """A tiny InternVL-Chat 1.5-style model (32-px tiles shuffled to 4 tokens) with a LLaMA-shaped
  LLM of `family`, trained from random params for 40 steps; with `lora_config`, the ViT, MLP and
  LLM are frozen and the adapters alone train."""
  llm_changes, template = _DEMO_FAMILIES[family]
  vocab = (_DEMO_TOKENIZER.vocab_size + len(IMAGE_TOKENS)
           + len(templates.TEMPLATES[template].special_tokens))
  llm = llama_preset("tiny", vocab_size=vocab, hidden_size=128, mlp_dim=352, max_positions=256,
                     **llm_changes)
  model = ChatConfig(vision=vision_preset("tiny"), llm=llm, variant="v1.5", image_size=32,
                     image_context_id=_DEMO_TOKENIZER.vocab_size + IMAGE_TOKENS.index(IMAGE_CONTEXT),
                     template=template, lora=lora_config)
  frozen = lora_config is not None
  freeze = Freeze(vision=True, projector=frozen, llm=frozen)
  steps = 40
  train = train_config.TrainConfig(
      # 4 image tokens + the longest system prompt (internvl2_5's) + one round.
      stage=ChatStage(model, max_len=256, template=template),
      optimizer=OPTIMIZER.replace(learning_rate=1e-2 if frozen else 2e-3, b2=0.98,
                                  warmup_steps=4, total_steps=steps, **freeze.masks(lora_config)),
      global_batch_size=8, mesh=sharding.MeshConfig(data=-1), log_every=5,
      checkpoint_every=steps)
  data = train_config.DataConfig(sources=(demo.DemoSource(image_size=model.image_size),),
                                 tokenizer=_DEMO_TOKENIZER)
  return train_config.ExperimentConfig(train=train, data=data)


PRESETS = {"demo": demo_config, "gpu": gpu_config, "paper-pretrain": paper_pretrain_config,
           "paper": paper_config,
           **{f"demo-{family}": functools.partial(demo_family_config, family)
              for family in _DEMO_FAMILIES},
           "demo-lora": functools.partial(demo_family_config, "llama", LoraConfig(llm_rank=8)),
           **{f"finetune-{name}": functools.partial(finetune_config, name) for name in _FINETUNES},
           **{f"finetune-{name}-lora": functools.partial(finetune_config, name, use_lora=True)
              for name in _FINETUNES if not name.startswith("InternVL3")}}


def get_config(preset: str) -> train_config.ExperimentConfig:
  return train_config.preset(PRESETS, preset)


def data(config: train_config.ExperimentConfig):
  """This process's conversation batches of `config.data`."""
  return inputs.chat_batches(config)


def main(argv=None):
  cli.main(__doc__, "stage3_sft", PRESETS, data, argv,
           previous="python experiments/stage2_generative.py")


if __name__ == "__main__":
  main()
