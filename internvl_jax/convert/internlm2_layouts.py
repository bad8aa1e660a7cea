"""InternLM2 / InternLM2.5 in the official `InternLM2ForCausalLM` layout (chat spec 2.1), with its
config.json.

The model is the one LLaMA decoder; only the names differ, and `wqkv`, whose rows hold each
key/value group's query heads, then its key head, then its value head: (kv_heads, groups + 2,
head_dim). The table therefore depends on the head counts, and the key map fills `wqkv` from
per-group parts of the q, k and v kernels.
"""

from internvl_jax.config import LlamaConfig, RopeScaling
from internvl_jax.convert.keymap import Layout, Linear, Rule, Same

OFFICIAL = "internlm2"
ARCHITECTURE = "InternLM2ForCausalLM"

_LAYER = "model.layers.{layer}."


def layout(config: LlamaConfig) -> Layout:
  groups = config.num_heads // config.num_kv_heads
  wqkv = _LAYER + "attention.wqkv.weight"
  attention = "layers/self_attn/{}_proj/kernel"
  fused = tuple(
      rule for group in range(config.num_kv_heads) for rule in (
          # The per-layer q kernel is (embed, heads, head_dim): this group's query heads.
          Rule(attention.format("q"), wqkv, Linear(1),
               part=(1, slice(group * groups, (group + 1) * groups))),
          Rule(attention.format("k"), wqkv, Linear(1), part=(1, group)),
          Rule(attention.format("v"), wqkv, Linear(1), part=(1, group))))
  return Layout("InternLM2ForCausalLM (official)", (
      Rule("embed_tokens/embedding", "model.tok_embeddings.weight", Same()),
      Rule("layers/input_layernorm/scale", _LAYER + "attention_norm.weight", Same()),
      *fused,
      Rule(attention.format("o"), _LAYER + "attention.wo.weight", Linear(2)),
      Rule("layers/post_attention_layernorm/scale", _LAYER + "ffn_norm.weight", Same()),
      *(Rule(f"layers/mlp/{ours}_proj/kernel", _LAYER + f"feed_forward.{theirs}.weight", Linear(1))
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
      Rule("norm/scale", "model.norm.weight", Same()),
      Rule("lm_head/kernel", "output.weight", Linear(1)),
  ), ignored=(r"model\.layers\.\d+\.attention\.rotary_emb\.inv_freq", r"output\.weight"))


def config_json(config: LlamaConfig) -> dict:
  """The config.json that the official InternLM2 code (`configuration_internlm2.py`) reads."""
  scaling = config.rope_scaling
  if config.qkv_bias or (scaling is not None and (scaling.kind == "longrope" or (
      scaling.kind == "dynamic" and (scaling.length != "keys"
                                     or scaling.original_max_positions != config.max_positions)))):
    raise ValueError("InternLM2 has no q/k/v biases without an o bias, and its RoPE scaling is "
                     "linear or dynamic NTK keyed on the keys beyond max_position_embeddings; "
                     f"got qkv_bias={config.qkv_bias}, rope_scaling={scaling}.")
  return {
      "architectures": [ARCHITECTURE],
      "model_type": "internlm2",
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
      "rope_scaling": None if scaling is None else {"type": scaling.kind, "factor": scaling.factor},
      "bias": False,
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "pad_token_id": config.pad_id,
      "initializer_range": 0.02,
  }


def config_from_json(data: dict) -> LlamaConfig:
  """The LlamaConfig of an official InternLM2 config.json."""
  try:
    if data.get("bias", False):
      raise ValueError("bias=true is not supported (no released InternLM2 has biases).")
    if data.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (InternLM2 uses 'silu').")
    max_positions, rope = data.get("max_position_embeddings", 2048), data.get("rope_scaling")
    scaling = None
    if rope is not None:
      if rope.get("type") not in ("linear", "dynamic"):
        raise ValueError(f"rope_scaling {rope} is not supported (InternLM2 has linear and dynamic).")
      # The official dynamic NTK passes the key length (kv_seq_len), cache included.
      scaling = (RopeScaling("linear", float(rope["factor"])) if rope["type"] == "linear" else
                 RopeScaling("dynamic", float(rope["factor"]), max_positions, length="keys"))
    num_heads = data["num_attention_heads"]
    eos_id, pad_id = data.get("eos_token_id", 2), data.get("pad_token_id")
    return LlamaConfig(
        vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
        num_layers=data["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=data.get("num_key_value_heads") or num_heads,
        mlp_dim=data["intermediate_size"], norm_eps=data.get("rms_norm_eps", 1e-6),
        max_positions=max_positions, rope_base=float(data.get("rope_theta", 10000.0)),
        rope_scaling=scaling, tie_embeddings=data.get("tie_word_embeddings", False),
        bos_id=data.get("bos_token_id", 1), eos_id=eos_id[0] if isinstance(eos_id, list) else eos_id,
        pad_id=pad_id if pad_id is not None and 0 <= pad_id < data["vocab_size"] else 0)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that an InternLM2 config has.") from None
