"""The presets named after the released InternVL-Chat 1.5-3 checkpoints (chat spec 1).

Each preset's parameter count, from the model's own init under `jax.eval_shape`, must equal the
count worked out here by hand from the released config numbers (chat spec 1.2, 1.3, 3.1), and
round to the figures the model cards state.
"""

import functools

import jax
import numpy as np
import pytest

from internvl_jax import config
from internvl_jax.models import chat

PATCH, TILE = 14, 448

# ViT: width, blocks, MLP width, and whether it is the 6B kind (RMSNorm and qk-norm, no qkv bias)
# or the 300M kind (LayerNorm with biases, qkv bias) (chat spec 1.2).
VITS = {
    "InternViT-6B-448px-V1-5": (3200, 45, 12800, True),
    "InternViT-300M-448px": (1024, 24, 4096, False),
}
# LLM: hidden, layers, heads, kv heads, intermediate, vocabulary in InternVL, q/k/v bias (spec 1.3).
LLMS = {
    "internlm2-chat-1_8b": (2048, 24, 16, 8, 8192, 92553, False),
    "internlm2-chat-20b": (6144, 48, 48, 8, 16384, 92553, False),
    "internlm2_5-1_8b-chat": (2048, 24, 16, 8, 8192, 92553, False),
    "internlm2_5-7b-chat": (4096, 32, 32, 8, 14336, 92553, False),
    "internlm2_5-20b-chat": (6144, 48, 48, 8, 16384, 92553, False),
    "Phi-3-mini-128k-instruct": (3072, 32, 32, 32, 8192, 32020, False),
    "Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151674, True),
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151674, True),
    "Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151674, True),
    "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 151674, True),
    "Qwen2.5-32B": (5120, 64, 40, 8, 27648, 151674, True),
}
# LLM preset: rope theta, rope scaling, max positions, RMSNorm eps, eos id (spec 1.3, 2.1-2.3, 5).
# InternLM2's dynamic NTK keys on the kv length; Phi-3's LongRoPE lists come with a checkpoint.
_INTERNLM2 = dict(max_positions=32768, norm_eps=1e-5, eos_id=2)
_QWEN2_5 = dict(rope_base=1e6, rope_scaling=None, max_positions=32768, norm_eps=1e-6,
                eos_id=151645)
LLM_FIELDS = {
    "internlm2-chat-1.8b": dict(
        _INTERNLM2, rope_base=1e6, rope_scaling=config.RopeScaling("dynamic", 2.0, 32768, "keys")),
    "internlm2-chat-20b": dict(
        _INTERNLM2, rope_base=1e6, rope_scaling=config.RopeScaling("dynamic", 3.0, 32768, "keys")),
    "internlm2.5-7b-chat": dict(
        _INTERNLM2, rope_base=1e6, rope_scaling=config.RopeScaling("dynamic", 2.0, 32768, "keys")),
    "internlm2.5-20b-chat": dict(
        _INTERNLM2, rope_base=5e7, rope_scaling=config.RopeScaling("dynamic", 2.5, 32768, "keys")),
    "phi-3-mini-128k": dict(rope_base=1e4, rope_scaling=None, max_positions=131072, norm_eps=1e-5,
                            eos_id=32000),
    **{name: _QWEN2_5 for name in ("qwen2.5-0.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-32b")},
}
# Checkpoint: ViT, LLM, template, <IMG_CONTEXT> id (chat spec 1.1, 1.3; Phi-3's 32013 is derived:
# InternVL's 9 tokens take ids 32011-32019 and <IMG_CONTEXT> is the third).
RELEASED = {
    "InternVL-Chat-V1-5": ("InternViT-6B-448px-V1-5", "internlm2-chat-20b", "internlm2-chat", 92546),
    "Mini-InternVL-Chat-2B-V1-5": ("InternViT-300M-448px", "internlm2-chat-1_8b", "internlm2-chat",
                                   92546),
    "Mini-InternVL-Chat-4B-V1-5": ("InternViT-300M-448px", "Phi-3-mini-128k-instruct", "phi3-chat",
                                   32013),
    "InternVL2-2B": ("InternViT-300M-448px", "internlm2-chat-1_8b", "internlm2-chat", 92546),
    "InternVL2-4B": ("InternViT-300M-448px", "Phi-3-mini-128k-instruct", "phi3-chat", 32013),
    "InternVL2-8B": ("InternViT-300M-448px", "internlm2_5-7b-chat", "internlm2-chat", 92546),
    "InternVL2-26B": ("InternViT-6B-448px-V1-5", "internlm2-chat-20b", "internlm2-chat", 92546),
    "InternVL2_5-1B": ("InternViT-300M-448px", "Qwen2.5-0.5B", "internvl2_5", 151667),
    "InternVL2_5-2B": ("InternViT-300M-448px", "internlm2_5-1_8b-chat", "internvl2_5", 92546),
    "InternVL2_5-4B": ("InternViT-300M-448px", "Qwen2.5-3B", "internvl2_5", 151667),
    "InternVL2_5-8B": ("InternViT-300M-448px", "internlm2_5-7b-chat", "internvl2_5", 92546),
    "InternVL2_5-26B": ("InternViT-6B-448px-V1-5", "internlm2_5-20b-chat", "internvl2_5", 92546),
    "InternVL2_5-38B": ("InternViT-6B-448px-V1-5", "Qwen2.5-32B", "internvl2_5", 151667),
    "InternVL3-1B": ("InternViT-300M-448px", "Qwen2.5-0.5B", "internvl2_5", 151667),
    "InternVL3-2B": ("InternViT-300M-448px", "Qwen2.5-1.5B", "internvl2_5", 151667),
    "InternVL3-8B": ("InternViT-300M-448px", "Qwen2.5-7B", "internvl2_5", 151667),
    "InternVL3-38B": ("InternViT-6B-448px-V1-5", "Qwen2.5-32B", "internvl2_5", 151667),
}


def vit_params(width, layers, mlp, six_b):
  """Patch conv + bias, CLS, 1025 positions, then per block: qkv (+bias on 300M), proj, q/k
  RMSNorms (6B), fc1, fc2, two norms (RMSNorm: weight; LayerNorm: weight and bias), ls1, ls2."""
  embeddings = PATCH * PATCH * 3 * width + width + width + ((TILE // PATCH)**2 + 1) * width
  attention = 3 * width * width + width * width + width + (2 * width if six_b else 3 * width)
  norms = 2 * width * (1 if six_b else 2)
  block = attention + 2 * width * mlp + mlp + width + norms + 2 * width
  return embeddings + layers * block


def mlp1_params(vit_width, hidden):
  """LayerNorm(4 Cv) -> Linear(4 Cv, d) -> GELU -> Linear(d, d), for pixel shuffle 0.5."""
  return 2 * 4 * vit_width + 4 * vit_width * hidden + hidden + hidden * hidden + hidden


def llm_params(hidden, layers, heads, kv_heads, intermediate, vocab, qkv_bias):
  """Embedding, per layer q/k/v(+bias)/o, gate/up/down and two RMSNorms, the final norm, and an
  untied head: InternVL forces tie_word_embeddings False (chat spec 2.6); that the released
  safetensors of the small Qwen models hold a separate lm_head is unverified (spec 7.5)."""
  head_dim = hidden // heads
  qkv = (heads + 2 * kv_heads) * head_dim
  attention = hidden * qkv + (qkv if qkv_bias else 0) + heads * head_dim * hidden
  block = attention + 3 * hidden * intermediate + 2 * hidden
  return vocab * hidden + layers * block + hidden + hidden * vocab


def released_params(name):
  vit, llm, _, _ = RELEASED[name]
  return (vit_params(*VITS[vit]) + mlp1_params(VITS[vit][0], LLMS[llm][0]) +
          llm_params(*LLMS[llm]))


@functools.cache
def model_params(name):
  """Parameter count per top-level module, from the model's init traced by eval_shape."""
  params = chat.abstract_params(config.CHAT_PRESETS[name])
  return {module: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
          for module, tree in params.items()}


def test_every_released_checkpoint_has_a_preset():
  assert set(RELEASED) <= set(config.CHAT_PRESETS)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_preset(name):
  vit, llm, template, image_context_id = RELEASED[name]
  preset = config.chat_preset(name)  # replace() runs ChatConfig's validation again
  width, layers, _, _ = VITS[vit]
  assert (preset.vision.hidden_size, preset.vision.num_layers) == (width, layers)
  assert (preset.llm.hidden_size, preset.llm.vocab_size) == (LLMS[llm][0], LLMS[llm][5])
  assert not preset.llm.tie_embeddings
  assert preset.template == template
  assert preset.image_context_id == image_context_id
  assert (preset.variant, preset.image_size, preset.select_layer, preset.downsample_ratio,
          preset.ps_version, preset.projector_eps) == ("v1.5", 448, -1, 0.5, "v2", 1e-5)
  assert (preset.dynamic_image_size, preset.use_thumbnail, preset.min_dynamic_patch,
          preset.max_dynamic_patch) == (True, True, 1, 12)
  assert preset.num_image_tokens == 256


@pytest.mark.parametrize("name", sorted(LLM_FIELDS))
def test_llm_preset(name):
  preset = config.llama_preset(name)
  assert {field: getattr(preset, field) for field in LLM_FIELDS[name]} == LLM_FIELDS[name]


def test_internvl3_adds_dynamic_rope_to_qwen2_5():
  # Seen in InternVL3-1B's llm_config (chat spec 2.3): transformers' dynamic NTK, on positions.
  for name in ("InternVL3-1B", "InternVL3-2B", "InternVL3-8B", "InternVL3-38B"):
    assert config.chat_preset(name).llm.rope_scaling == config.RopeScaling("dynamic", 2.0, 32768)
  assert config.chat_preset("InternVL2_5-1B").llm.rope_scaling is None


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_count_matches_the_released_config(name):
  assert sum(model_params(name).values()) == released_params(name)


def test_parameter_counts_round_to_the_model_cards():
  # The InternVL2-8B card's benchmark table ("Model Size") and the InternViT cards ("Params (M)").
  assert round(sum(model_params("InternVL-Chat-V1-5").values()) / 1e9, 1) == 25.5
  assert round(sum(model_params("InternVL2-8B").values()) / 1e9, 1) == 8.1
  assert round(model_params("InternVL-Chat-V1-5")["vision_model"] / 1e6, -1) == 5540
  assert round(model_params("InternVL2-8B")["vision_model"] / 1e6) == 304
