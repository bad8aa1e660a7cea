"""Analytic model FLOPs (multiply-adds count 2), for throughput and MFU figures.

XLA's cost analysis counts a scanned layer once, so logs and benchmarks use these formulas; a test
checks them against XLA on a one-layer model.
"""

from internvl_jax.config import InternVLConfig, LlamaConfig, VisionConfig


def vit_forward_flops(config: VisionConfig, image_hw: tuple[int, int], keep_fraction: float = 1.0) -> int:
  """Matmul FLOPs of one image through InternViT (patch embedding, attention, MLP)."""
  d, p = config.hidden_size, config.patch_size
  num_patches = (image_hw[0] // p) * (image_hw[1] // p)
  tokens = 1 + max(1, int(round(num_patches * keep_fraction)))
  patch_embed = 2 * num_patches * p * p * config.num_channels * d
  projections = 2 * tokens * d * (3 * d + d)  # qkv and output projection
  attention = 2 * 2 * tokens * tokens * d  # scores and the weighted sum of values
  mlp = 2 * 2 * tokens * d * config.mlp_dim
  return patch_embed + config.num_layers * (projections + attention + mlp)


def training_flops(forward_flops: int) -> int:
  """Forward plus backward: the backward pass costs twice the forward."""
  return 3 * forward_flops


def llama_forward_flops(config: LlamaConfig, tokens: int, lm_head: bool = True) -> int:
  """Matmul FLOPs of one sequence of `tokens` through LLaMA (projections, attention, SwiGLU MLP).

  Attention counts the full tokens x tokens score matrix, as the model computes it (masked, not
  skipped). The embedding lookup is a gather (no FLOPs); `lm_head` adds the vocabulary logits.
  """
  d, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
  projections = 2 * tokens * d * (2 * d + 2 * kv_width)  # q and o, k and v
  attention = 2 * 2 * tokens * tokens * d
  mlp = 2 * 3 * tokens * d * config.mlp_dim
  head = 2 * tokens * d * config.vocab_size if lm_head else 0
  return config.num_layers * (projections + attention + mlp) + head


def internvl_c_forward_flops(config: InternVLConfig, image_hw: tuple[int, int], text_tokens: int,
                             keep_fraction: float = 1.0) -> int:
  """Matmul FLOPs of one (image, text) pair through InternVL-C: both towers, the attention
  pooling (one query over the kept tokens) and the text projection of the EOS feature."""
  vision = config.vision
  p = vision.patch_size
  num_patches = (image_hw[0] // p) * (image_hw[1] // p)
  tokens = 1 + max(1, int(round(num_patches * keep_fraction)))
  d = vision.hidden_size
  pooling = 2 * d * d + 2 * 2 * tokens * d * d + 2 * 2 * tokens * d + 2 * d * config.embed_dim
  text_projection = 2 * config.text.hidden_size * config.embed_dim
  return (vit_forward_flops(vision, image_hw, keep_fraction) + pooling +
          llama_forward_flops(config.text, text_tokens, lm_head=False) + text_projection)
