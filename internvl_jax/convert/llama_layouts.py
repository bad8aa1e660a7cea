"""LLaMA-family LLMs in transformers' layouts: `LlamaForCausalLM` (spec 5.3-5.5; also Yi and
LLaMA-3) and `Qwen2ForCausalLM` (chat spec 2.3), with their config.json.

The Flax params carry transformers' module names, so the tables are mostly renames; Qwen2's adds
the q/k/v biases. With tied embeddings the model has no `lm_head` param and the layout expects no
`lm_head.weight`; a checkpoint that still holds one (a copy of the embedding) is read without
complaint, as transformers does.
"""

from internvl_jax.config import LlamaConfig, RopeScaling
from internvl_jax.convert.keymap import Flatten, Layout, Linear, Rule, Same

TRANSFORMERS = "transformers"
QWEN2 = "qwen2"

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
_BIASES = tuple((f"layers/self_attn/{name}_proj/bias", Flatten(), _LAYER + f"self_attn.{name}_proj.bias")
                for name in "qkv")
_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq",
            r"lm_head\.weight")


def _layout(name: str, table) -> Layout:
  return Layout(name, tuple(Rule(flax_path, key, transform) for flax_path, transform, key in table),
                ignored=_IGNORED)


LAYOUTS = {
    TRANSFORMERS: _layout("LlamaForCausalLM (transformers)", _TABLE),
    QWEN2: _layout("Qwen2ForCausalLM (transformers)", _TABLE + _BIASES),
}
ARCHITECTURES = {"LlamaForCausalLM": TRANSFORMERS, "Qwen2ForCausalLM": QWEN2}
_MODEL_TYPES = {TRANSFORMERS: "llama", QWEN2: "qwen2"}


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")


def _rope_parameters(config: LlamaConfig) -> dict:
  """transformers' `rope_parameters`; refuses the scalings its LLaMA and Qwen2 compute otherwise."""
  scaling, parameters = config.rope_scaling, {"rope_type": "default", "rope_theta": config.rope_base}
  if scaling is None:
    return parameters
  if scaling.kind == "longrope" or (scaling.kind == "dynamic" and (
      scaling.length != "positions" or scaling.original_max_positions != config.max_positions)):
    raise ValueError(f"rope_scaling {scaling} has no transformers LLaMA / Qwen2 equivalent: their "
                     "dynamic NTK keys on the positions and max_position_embeddings, and LongRoPE "
                     "is Phi-3's.")
  return parameters | {"rope_type": scaling.kind, "factor": scaling.factor}


def config_json(config: LlamaConfig, layout: str = TRANSFORMERS) -> dict:
  """The config.json that transformers' LlamaForCausalLM or Qwen2ForCausalLM reads."""
  _check_layout(layout)
  if config.qkv_bias != (layout == QWEN2):
    raise ValueError(f"A config {'with' if config.qkv_bias else 'without'} q/k/v biases has no "
                     f"{LAYOUTS[layout].name} layout; use the {QWEN2 if config.qkv_bias else TRANSFORMERS!r} one.")
  rope = _rope_parameters(config)
  data = {
      "architectures": [next(a for a, name in ARCHITECTURES.items() if name == layout)],
      "model_type": _MODEL_TYPES[layout],
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
      "rope_parameters": rope,
      # Older transformers read the scaling from here (and 5.x prefers it when present).
      "rope_scaling": None if config.rope_scaling is None else {
          "type": rope["rope_type"], "rope_type": rope["rope_type"], "factor": rope["factor"]},
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "pad_token_id": config.pad_id,
      "initializer_range": 0.02,
  }
  if layout == QWEN2:
    return data | {"use_sliding_window": False}
  return data | {"attention_bias": False, "mlp_bias": False}


def _rope_scaling(rope: dict, max_positions: int) -> RopeScaling | None:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind not in ("linear", "dynamic"):
    raise ValueError(f"RoPE scaling {rope} is not supported (only the default, linear and "
                     "dynamic rotary embeddings).")
  if kind == "linear":
    return RopeScaling(kind, float(rope["factor"]))
  # transformers' dynamic NTK keys on max(position) + 1 and scales beyond max_position_embeddings.
  return RopeScaling(kind, float(rope["factor"]), original_max_positions=max_positions)


def config_from_json(data: dict, layout: str = TRANSFORMERS) -> LlamaConfig:
  """The LlamaConfig of a LlamaForCausalLM or Qwen2ForCausalLM config.json (older and newer
  transformers spellings)."""
  _check_layout(layout)
  try:
    hidden_size, num_heads = data["hidden_size"], data["num_attention_heads"]
    # transformers 5 prefers `rope_scaling` when both are present; the theta may sit in either.
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    theta = (data.get("rope_parameters") or {}).get("rope_theta", data.get("rope_theta", 10000.0))
    max_positions = data.get("max_position_embeddings", 2048)
    if layout == QWEN2 and data.get("use_sliding_window", False):
      raise ValueError("use_sliding_window=true is not supported (InternVL's Qwen2 LLMs do not "
                       "use it).")
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
        max_positions=max_positions, rope_base=float(rope.get("rope_theta", theta)),
        rope_scaling=_rope_scaling(rope, max_positions), qkv_bias=layout == QWEN2,
        tie_embeddings=data.get("tie_word_embeddings", False), bos_id=data.get("bos_token_id", 1),
        eos_id=eos_id[0] if isinstance(eos_id, list) else eos_id,
        pad_id=pad_id)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a LLaMA config has.") from None
