"""LLaMA in transformers' `LlamaForCausalLM` layout (spec 5.3-5.5), with its config.json.

The Flax params carry transformers' module names, so the table is mostly renames. With tied
embeddings the model has no `lm_head` param and the layout expects no `lm_head.weight`; a
checkpoint that still holds one (a copy of the embedding) is read without complaint, as
transformers does.
"""

from internvl_jax.config import LlamaConfig
from internvl_jax.convert.keymap import Layout, Linear, Rule, Same

TRANSFORMERS = "transformers"

_SAME = Same()
_LAYER = "model.layers.{layer}."

# Flax path, transform, transformers key.
_TABLE = (
    ("embed_tokens/embedding", _SAME, "model.embed_tokens.weight"),
    ("layers/input_layernorm/scale", _SAME, _LAYER + "input_layernorm.weight"),
    *((f"layers/self_attn/{name}_proj/kernel", Linear(1), _LAYER + f"self_attn.{name}_proj.weight")
      for name in "qkv"),
    ("layers/self_attn/o_proj/kernel", Linear(2), _LAYER + "self_attn.o_proj.weight"),
    ("layers/post_attention_layernorm/scale", _SAME, _LAYER + "post_attention_layernorm.weight"),
    *((f"layers/mlp/{name}_proj/kernel", Linear(1), _LAYER + f"mlp.{name}_proj.weight")
      for name in ("gate", "up", "down")),
    ("norm/scale", _SAME, "model.norm.weight"),
    ("lm_head/kernel", Linear(1), "lm_head.weight"),
)

LAYOUTS = {
    TRANSFORMERS: Layout(
        "LlamaForCausalLM (transformers)",
        tuple(Rule(flax_path, key, transform) for flax_path, transform, key in _TABLE),
        ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq",
                 r"lm_head\.weight")),
}
ARCHITECTURES = {"LlamaForCausalLM": TRANSFORMERS}


def config_json(config: LlamaConfig, layout: str = TRANSFORMERS) -> dict:
  """The config.json that transformers' LlamaForCausalLM reads."""
  if layout != TRANSFORMERS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_positions,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
      "tie_word_embeddings": config.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "pad_token_id": config.pad_id,
      "initializer_range": 0.02,
  }


def config_from_json(data: dict, layout: str = TRANSFORMERS) -> LlamaConfig:
  """The LlamaConfig of a LlamaForCausalLM config.json (older and newer transformers spellings)."""
  if layout != TRANSFORMERS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")
  try:
    hidden_size, num_heads = data["hidden_size"], data["num_attention_heads"]
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ValueError(f"RoPE scaling {rope} is not supported (only the default rotary embedding).")
    if data.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (LLaMA uses 'silu').")
    for flag in ("attention_bias", "mlp_bias"):
      if data.get(flag, False):
        raise ValueError(f"{flag}=true is not supported (LLaMA has no biases).")
    if data.get("head_dim", hidden_size // num_heads) != hidden_size // num_heads:
      raise ValueError(f"head_dim {data['head_dim']} differs from hidden_size / num_attention_heads.")
    eos_id, pad_id = data.get("eos_token_id", 2), data.get("pad_token_id")
    # Some LLaMA configs say pad null or -1; the pad id only fills generated rows after EOS.
    pad_id = pad_id if pad_id is not None and 0 <= pad_id < data["vocab_size"] else 0
    return LlamaConfig(
        vocab_size=data["vocab_size"], hidden_size=hidden_size, num_layers=data["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=data.get("num_key_value_heads") or num_heads,
        mlp_dim=data["intermediate_size"], norm_eps=data.get("rms_norm_eps", 1e-6),
        max_positions=data.get("max_position_embeddings", 2048),
        rope_base=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        tie_embeddings=data.get("tie_word_embeddings", False), bos_id=data.get("bos_token_id", 1),
        eos_id=eos_id[0] if isinstance(eos_id, list) else eos_id,
        pad_id=pad_id)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a LLaMA config has.") from None
