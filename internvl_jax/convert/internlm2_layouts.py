"""InternLM2 / InternLM2.5 in the official `InternLM2ForCausalLM` layout (chat spec 2.1), with its
config.json.

The model is the one LLaMA decoder; only the names differ, and `wqkv`, whose rows hold each
key/value group's query heads, then its key head, then its value head: (kv_heads, groups + 2,
head_dim). The table therefore depends on the head counts, and the key map fills `wqkv` from
per-group parts of the q, k and v kernels.
"""

from internvl_jax.config import LlamaConfig, RopeScaling
from internvl_jax.convert import llama_layouts
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
      **llama_layouts.family_config_json(config),
      "rope_scaling": None if scaling is None else {"type": scaling.kind, "factor": scaling.factor},
      "bias": False,
  }


def config_from_json(data: dict) -> LlamaConfig:
  """The LlamaConfig of an official InternLM2 config.json."""
  try:
    if data.get("bias", False):
      raise ValueError("bias=true is not supported (no released InternLM2 has biases).")
    max_positions, rope = data.get("max_position_embeddings", 2048), data.get("rope_scaling")
    scaling = None
    if rope is not None:
      if rope.get("type") not in ("linear", "dynamic"):
        raise ValueError(f"rope_scaling {rope} is not supported (InternLM2 has linear and dynamic).")
      # The official dynamic NTK passes the key length (kv_seq_len), cache included.
      scaling = (RopeScaling("linear", float(rope["factor"])) if rope["type"] == "linear" else
                 RopeScaling("dynamic", float(rope["factor"]), max_positions, length="keys"))
    return llama_layouts.family_config_from_json(
        data, rope_base=float(data.get("rope_theta", 10000.0)), rope_scaling=scaling,
        architecture=ARCHITECTURE)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that an InternLM2 config has.") from None
