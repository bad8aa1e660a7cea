"""Analytic model FLOPs (multiply-adds count 2), for throughput and MFU figures.

XLA's cost analysis counts a scanned layer once, so logs and benchmarks use these formulas; a test
checks them against XLA on a one-layer model.
"""

from internvl_jax.config import ChatConfig, InternVLConfig, LlamaConfig, VisionConfig


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
  pooling = attention_pooling_flops(vision.hidden_size, tokens, config.embed_dim)
  text_projection = 2 * config.text.hidden_size * config.embed_dim
  return (vit_forward_flops(vision, image_hw, keep_fraction) + pooling +
          llama_forward_flops(config.text, text_tokens, lm_head=False) + text_projection)


def attention_pooling_flops(width: int, tokens: int, out_dim: int) -> int:
  """One query (the mean token) attending over `tokens` (`AttentionPooling`)."""
  return 2 * width * width + 2 * 2 * tokens * width * width + 2 * 2 * tokens * width + \
      2 * width * out_dim


def internvl_g_stage2_flops(config: InternVLConfig, image_hw: tuple[int, int], text_tokens: int,
                            packing: tuple[int, int] | None = None) -> dict[str, int]:
  """Matmul FLOPs of one stage-2 example (an image and its ITM, ITC and ITG texts) by part, or
  with `packing` = (slots, length) of one packed row: that many examples whose ITG captions share
  one row of `length` tokens, run as a second QLLaMA pass over [slots x queries; captions].

  "vision": InternViT. "qllama": the [queries; text] sequences through QLLaMA (cross-attention
  keys and values projected once per image and pass), the ITG vocabulary logits, the ITM head,
  `clip_projector2` and the text projection. "trainable": the matmuls of that with trainable
  weights (cross-attention, ITM head, `clip_projector2`). "attention": its matmuls of two
  activations (scores and weighted values). "backbone": `clip_projector` on InternViT's tokens
  (InternVL-C's image embedding, which the stage-2 forward also returns).
  """
  text, vision = config.text, config.vision
  d, queries = text.hidden_size, config.num_queries
  slots, itg_length = (1, text_tokens) if packing is None else packing
  p = vision.patch_size
  image_tokens = 1 + (image_hw[0] // p) * (image_hw[1] // p)
  num_cross = -(-text.num_layers // config.cross_attention_frequency)
  # Unpacked, the three texts share one pass; packed, ITM and ITC do and the captions have theirs.
  sequences = [queries + text_tokens] * 3 if packing is None else (
      [queries + text_tokens] * 2 * slots + [slots * queries + itg_length])
  passes = 1 if packing is None else 2
  cross_projections = num_cross * slots * (3 * 2 * 2 * queries * d * d +
                                           passes * 2 * 2 * image_tokens * vision.hidden_size * d)
  cross_attention = num_cross * slots * 3 * 2 * 2 * queries * image_tokens * d
  pooling = attention_pooling_flops(d, queries, config.embed_dim)
  pooling_attention = 2 * 2 * queries * d
  itm_head = 2 * queries * d * 2
  trainable = cross_projections + slots * (itm_head + pooling - pooling_attention)
  qllama = (sum(llama_forward_flops(text, length, lm_head=False) for length in sequences) +
            2 * itg_length * d * text.vocab_size + cross_projections + cross_attention +
            slots * (itm_head + pooling + 2 * d * config.embed_dim))
  attention = (sum(text.num_layers * 2 * 2 * length * length * d for length in sequences) +
               cross_attention + slots * pooling_attention)
  backbone = slots * attention_pooling_flops(vision.hidden_size, image_tokens, config.embed_dim)
  return {"vision": slots * vit_forward_flops(vision, image_hw), "qllama": qllama,
          "trainable": trainable, "attention": attention, "backbone": backbone}


def internvl_g_stage2_forward_flops(config: InternVLConfig, image_hw: tuple[int, int],
                                    text_tokens: int,
                                    packing: tuple[int, int] | None = None) -> int:
  """Matmul FLOPs of one stage-2 example's (or packed row's) forward (`internvl_g_stage2_flops`)."""
  parts = internvl_g_stage2_flops(config, image_hw, text_tokens, packing)
  return parts["vision"] + parts["qllama"] + parts["backbone"]


def internvl_g_stage2_training_flops(config: InternVLConfig, image_hw: tuple[int, int],
                                     text_tokens: int, backbone_itc: bool = False,
                                     packing: tuple[int, int] | None = None) -> int:
  """Forward and backward of one stage-2 example (or packed row) with InternViT and LLaMA frozen.

  InternViT runs forward only (nothing before it trains), and so does `clip_projector` where a
  loss uses it (`backbone_itc`). Backward through QLLaMA and the heads propagates every
  activation gradient (one forward's worth), adds weight gradients for the trainable matmuls
  only, and both operand gradients for attention. An upper estimate: XLA drops the backward of
  ITC text rows, which never see the queries.
  """
  parts = internvl_g_stage2_flops(config, image_hw, text_tokens, packing)
  return (parts["vision"] + 2 * parts["qllama"] + parts["trainable"] + parts["attention"] +
          (parts["backbone"] if backbone_itc else 0))


def chat_flops(config: ChatConfig, tokens: int, tiles: int) -> dict[str, int]:
  """Matmul FLOPs of one InternVL-Chat example (a `ChatConfig`; `tiles` tile slots, all run
  through the ViT; a `tokens`-long sequence) by part.

  "vision": InternViT (every block, whichever layer is selected) and for the "qllama" variant
  QLLaMA's queries in image mode. "projector_in": the projectors' first Linear, whose input is
  the vision side's output. "projector_out": their second. "llm": the LLM with its vocabulary
  logits. "llm_attention": the LLM's matmuls of two activations (scores and weighted values).
  """
  vision, llm = config.vision, config.llm
  size, h = config.image_size, llm.hidden_size
  patches = config.grid_size**2
  if config.variant == "v1.5":
    patches, width = config.num_image_tokens, vision.hidden_size * config.shuffle_factor**2
  else:
    width = vision.hidden_size
  vit = vit_forward_flops(vision, (size, size))
  projector_in, projector_out = 2 * patches * width * h, 2 * patches * h * h
  if config.variant == "qllama":
    q, queries = config.qllama.text.hidden_size, config.qllama.num_queries
    image_tokens = 1 + patches
    num_cross = config.qllama.num_blocks
    vit += (llama_forward_flops(config.qllama.text, queries, lm_head=False) +
            num_cross * (2 * 2 * queries * q * q + 2 * 2 * image_tokens * vision.hidden_size * q +
                         2 * 2 * queries * image_tokens * q))
    projector_in += 2 * queries * q * h
    projector_out += 2 * queries * h * h
  return {"vision": tiles * vit, "projector_in": tiles * projector_in,
          "projector_out": tiles * projector_out, "llm": llama_forward_flops(llm, tokens),
          "llm_attention": llm.num_layers * 2 * 2 * tokens * tokens * h}


def chat_training_flops(config: ChatConfig, tokens: int, tiles: int,
                        train_llm: bool = True) -> int:
  """Forward and backward of one InternVL-Chat example with the vision side frozen.

  The vision side runs forward only (nothing before it trains). The projectors' first Linear
  needs its weight gradient only (its input is frozen); the rest of a trained part costs three
  forwards. A frozen LLM (v1.0 step 1) still propagates activation gradients to the image
  tokens: one forward's worth, plus both operand gradients of its attention matmuls.
  """
  parts = chat_flops(config, tokens, tiles)
  llm = 3 * parts["llm"] if train_llm else 2 * parts["llm"] + parts["llm_attention"]
  return parts["vision"] + 2 * parts["projector_in"] + 3 * parts["projector_out"] + llm
