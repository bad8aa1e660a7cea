"""LLaMA-family LLMs in transformers' layouts: `LlamaForCausalLM` (spec 5.3-5.5; also Yi and
LLaMA-3), `Qwen2ForCausalLM` and `Phi3ForCausalLM` (chat spec 2.2-2.3), with their config.json.

The Flax params carry transformers' module names, so the tables are mostly renames; Qwen2's adds
the q/k/v biases, and Phi-3's fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (rows
in that order), which the key map splits. With tied embeddings the model has no `lm_head` param
and the layout expects no `lm_head.weight`; a checkpoint that still holds one (a copy of the
embedding) is read without complaint, as transformers does. A config read from a config.json
records the class it names in `LlamaConfig.architecture`.
"""

from internvl_jax.config import LlamaConfig, RopeScaling
from internvl_jax.convert.keymap import Flatten, Layout, Linear, Rule, Same

TRANSFORMERS = "transformers"
QWEN2 = "qwen2"
PHI3 = "phi3"

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
_BIASES = tuple((f"layers/self_attn/{name}_proj/bias", Flatten(),
                 _LAYER + f"self_attn.{name}_proj.bias") for name in "qkv")
_FUSED = {"self_attn.qkv_proj": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
          "mlp.gate_up_proj": ("mlp/gate_proj", "mlp/up_proj")}
_FUSED_PATHS = {f"layers/{part}/kernel" for parts in _FUSED.values() for part in parts}
_PHI3_TABLE = (tuple(row for row in _TABLE if row[0] not in _FUSED_PATHS)
               + tuple((f"layers/{part}/kernel", Linear(1), _LAYER + f"{key}.weight")
                       for key, parts in _FUSED.items() for part in parts))
_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq",
            r"lm_head\.weight")


def _layout(name: str, table) -> Layout:
  return Layout(name, tuple(Rule(flax_path, key, transform) for flax_path, transform, key in table),
                ignored=_IGNORED)


LAYOUTS = {
    TRANSFORMERS: _layout("LlamaForCausalLM (transformers)", _TABLE),
    QWEN2: _layout("Qwen2ForCausalLM (transformers)", _TABLE + _BIASES),
    PHI3: _layout("Phi3ForCausalLM (transformers)", _PHI3_TABLE),
}
ARCHITECTURES = {"LlamaForCausalLM": TRANSFORMERS, "Qwen2ForCausalLM": QWEN2,
                 "Phi3ForCausalLM": PHI3}
_ARCHITECTURE = {name: architecture for architecture, name in ARCHITECTURES.items()}
# config.json's `model_type` per layout: what a composite model's text config names.
MODEL_TYPES = {TRANSFORMERS: "llama", QWEN2: "qwen2", PHI3: "phi3"}


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")


def _rope_parameters(config: LlamaConfig, layout: str) -> dict:
  """transformers' `rope_parameters`; refuses the scalings the layout's model computes otherwise."""
  scaling, parameters = config.rope_scaling, {"rope_type": "default", "rope_theta": config.rope_base}
  if scaling is None:
    return parameters
  if layout == PHI3:
    if (scaling.kind != "longrope" or scaling.length != "positions"
        or scaling.factor != config.max_positions / scaling.original_max_positions):
      raise ValueError(f"rope_scaling {scaling} has no Phi-3 equivalent: Phi-3 has LongRoPE keyed "
                       "on the positions, its factor max_positions / original_max_positions.")
    return parameters | {"rope_type": "longrope", "short_factor": list(scaling.short_factor),
                         "long_factor": list(scaling.long_factor)}
  if scaling.kind == "longrope" or (scaling.kind == "dynamic" and (
      scaling.length != "positions" or scaling.original_max_positions != config.max_positions)):
    raise ValueError(f"rope_scaling {scaling} has no transformers LLaMA / Qwen2 equivalent: their "
                     "dynamic NTK keys on the positions and max_position_embeddings, and LongRoPE "
                     "is Phi-3's.")
  return parameters | {"rope_type": scaling.kind, "factor": scaling.factor}


def family_config_json(config: LlamaConfig) -> dict:
  """The config.json fields that every LLaMA-family model (InternLM2's too) names alike."""
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_positions,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_base,
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "pad_token_id": config.pad_id,
      "initializer_range": 0.02,
  }


def family_config_from_json(data: dict, **fields) -> LlamaConfig:
  """The LlamaConfig of `family_config_json`'s fields (raising KeyError when one that has no
  default is missing), with `fields` for the rest."""
  if data.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (the LLaMA family uses "
                     "'silu').")
  num_heads = data["num_attention_heads"]
  eos_id, pad_id = data.get("eos_token_id", 2), data.get("pad_token_id")
  # Some LLaMA configs say pad null or -1; the pad id only fills generated rows after EOS.
  pad_id = pad_id if pad_id is not None and 0 <= pad_id < data["vocab_size"] else 0
  return LlamaConfig(
      vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
      num_layers=data["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=data.get("num_key_value_heads") or num_heads, mlp_dim=data["intermediate_size"],
      norm_eps=data.get("rms_norm_eps", 1e-6),
      max_positions=data.get("max_position_embeddings", 2048),
      tie_embeddings=data.get("tie_word_embeddings", False), bos_id=data.get("bos_token_id", 1),
      eos_id=eos_id[0] if isinstance(eos_id, list) else eos_id, pad_id=pad_id, **fields)


def config_json(config: LlamaConfig, layout: str = TRANSFORMERS) -> dict:
  """The config.json that transformers' LlamaForCausalLM, Qwen2ForCausalLM or Phi3ForCausalLM
  reads."""
  _check_layout(layout)
  if config.qkv_bias != (layout == QWEN2):
    fitting = QWEN2 if config.qkv_bias else TRANSFORMERS
    raise ValueError(f"A config {'with' if config.qkv_bias else 'without'} q/k/v biases has no "
                     f"{LAYOUTS[layout].name} layout; use the {fitting!r} one.")
  rope = _rope_parameters(config, layout)
  data = {
      "architectures": [_ARCHITECTURE[layout]],
      "model_type": MODEL_TYPES[layout],
      **family_config_json(config),
      "head_dim": config.head_dim,
      "rope_parameters": rope,
      # Older transformers read the scaling from here (and 5.x prefers it when present).
      "rope_scaling": None if config.rope_scaling is None else (
          {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": rope["rope_type"]}),
  }
  if layout == QWEN2:
    return data | {"use_sliding_window": False}
  if layout == PHI3:
    original = config.max_positions if config.rope_scaling is None else (
        config.rope_scaling.original_max_positions)
    return data | {"original_max_position_embeddings": original, "sliding_window": None}
  return data | {"attention_bias": False, "mlp_bias": False}


def internvl_phi3_config_json(config: LlamaConfig) -> dict:
  """Phi3ForCausalLM's config.json as InternVL's own Phi-3 code reads it (chat spec 2.2): it
  takes LongRoPE only under its older name "su", in a `rope_scaling` of exactly three fields."""
  data = {k: v for k, v in config_json(config, PHI3).items() if k != "rope_parameters"}
  scaling = config.rope_scaling
  return data | {"rope_scaling": None if scaling is None else {
      "type": "su", "short_factor": list(scaling.short_factor),
      "long_factor": list(scaling.long_factor)}}


def _rope_scaling(rope: dict, data: dict, layout: str) -> RopeScaling | None:
  kind = rope.get("rope_type", rope.get("type", "default"))
  max_positions = data["max_position_embeddings"]
  if kind == "default":
    return None
  if layout == PHI3 and kind in ("su", "longrope"):  # "su" is the name the official Phi-3 code reads
    original = (data.get("original_max_position_embeddings")
                or rope["original_max_position_embeddings"])
    # transformers' order: an explicit factor, else Phi-3's ratio of the two lengths.
    return RopeScaling("longrope", rope.get("factor") or max_positions / original, original,
                       short_factor=rope["short_factor"], long_factor=rope["long_factor"])
  if layout == PHI3 or kind not in ("linear", "dynamic"):
    raise ValueError(f"RoPE scaling {rope} is not supported (only the default, linear and "
                     "dynamic rotary embeddings, and LongRoPE for Phi-3).")
  if kind == "linear":
    return RopeScaling(kind, float(rope["factor"]))
  # transformers' dynamic NTK keys on max(position) + 1 and scales beyond max_position_embeddings.
  return RopeScaling(kind, float(rope["factor"]), original_max_positions=max_positions)


def config_from_json(data: dict, layout: str = TRANSFORMERS) -> LlamaConfig:
  """The LlamaConfig of a LlamaForCausalLM, Qwen2ForCausalLM or Phi3ForCausalLM config.json (older
  and newer transformers spellings)."""
  _check_layout(layout)
  try:
    hidden_size, num_heads = data["hidden_size"], data["num_attention_heads"]
    # transformers 5 prefers `rope_scaling` when both are present; the theta may sit in either.
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    theta = (data.get("rope_parameters") or {}).get("rope_theta", data.get("rope_theta", 10000.0))
    data = {"max_position_embeddings": 2048} | data
    if layout == QWEN2 and data.get("use_sliding_window", False):
      raise ValueError("use_sliding_window=true is not supported (InternVL's Qwen2 LLMs do not "
                       "use it).")
    if layout == PHI3 and (data.get("sliding_window") or data["max_position_embeddings"]) < (
        data["max_position_embeddings"]):
      raise ValueError(f"sliding_window {data['sliding_window']} is not supported (attention here "
                       "sees the whole sequence).")
    if (rope.get("partial_rotary_factor") or data.get("partial_rotary_factor") or 1.0) != 1.0:
      raise ValueError("partial_rotary_factor is not supported (RoPE turns the whole head).")
    for flag in ("attention_bias", "mlp_bias"):
      if data.get(flag, False):
        raise ValueError(f"{flag}=true is not supported (LLaMA has no biases).")
    if data.get("head_dim", hidden_size // num_heads) != hidden_size // num_heads:
      raise ValueError(f"head_dim {data['head_dim']} differs from hidden_size / num_attention_heads.")
    return family_config_from_json(
        data, rope_base=float(rope.get("rope_theta", theta)),
        rope_scaling=_rope_scaling(rope, data, layout), qkv_bias=layout == QWEN2,
        architecture=_ARCHITECTURE[layout])
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a LLaMA config has.") from None
