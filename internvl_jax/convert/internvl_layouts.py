"""InternVL-G (InternVL-14B-224px) in OpenGVLab's `InternVLModel` layout (spec 5.4), with its
config.json.

The vision tower is InternViT's official table under `vision_model.`. QLLaMA is transformers'
LlamaForCausalLM table under `qllama.`, each layer rule split over the sub-layers of QLLaMA's
scanned blocks (`layer_j` of block i is PyTorch layer f * i + j), plus the cross-attention of
layers 0, f, 2f, ... and the `query_tokens`, which the reference keeps at the top level. The
attention pools keep the reference's names: `norm1_q`, `cross_attn.q` with a separate `q_bias`,
`cross_attn.proj`.
"""

import dataclasses
import functools

from internvl_jax.config import InternVLConfig
from internvl_jax.convert import intern_vit_layouts as vit_layouts
from internvl_jax.convert import llama_layouts
from internvl_jax.convert.keymap import Flatten, Layout, Linear, Rule, prefixed

# The official modeling code hard-codes these (spec 12); checkpoints with other values load
# nowhere but here.
OFFICIAL_VISION_WIDTH = 3200
OFFICIAL_NUM_QUERIES = 96
OFFICIAL_POOL_EPS = 1e-5


def _attention_pool_rules(name: str) -> tuple[Rule, ...]:
  rules = []
  for side in "qkv":
    rules += [Rule(f"{name}/norm_{side}/scale", f"{name}.norm1_{side}.weight"),
              Rule(f"{name}/norm_{side}/bias", f"{name}.norm1_{side}.bias"),
              Rule(f"{name}/cross_attn/{side}_proj/kernel", f"{name}.cross_attn.{side}.weight",
                   Linear(1)),
              Rule(f"{name}/cross_attn/{side}_proj/bias", f"{name}.cross_attn.{side}_bias", Flatten())]
  return tuple(rules) + (
      Rule(f"{name}/cross_attn/o_proj/kernel", f"{name}.cross_attn.proj.weight", Linear(2)),
      Rule(f"{name}/cross_attn/o_proj/bias", f"{name}.cross_attn.proj.bias"))


def _qllama_rules(frequency: int) -> tuple[Rule, ...]:
  rules = []
  for rule in llama_layouts.LAYOUTS[llama_layouts.TRANSFORMERS].rules:
    if not rule.stacked:
      rules += prefixed((rule,), "qllama/", "qllama.")
      continue
    in_layer = rule.flax.removeprefix("layers/")
    rules += [dataclasses.replace(rule, flax=f"qllama/layers/layer_{j}/{in_layer}",
                                  torch="qllama." + rule.torch, layer_stride=frequency, layer_offset=j)
              for j in range(frequency)]
  cross = functools.partial(Rule, layer_stride=frequency)
  flax, torch = "qllama/layers/layer_0/cross_attn/", "qllama.model.layers.{layer}.cross_attn."
  rules += [cross(f"{flax}{name}_proj/kernel", f"{torch}{name}_proj.weight", Linear(1))
            for name in "qkv"]
  rules += [cross(f"{flax}o_proj/kernel", f"{torch}o_proj.weight", Linear(2)),
            cross(f"{flax}norm1/scale", f"{torch}norm1.weight"),
            cross(f"{flax}norm2/scale", f"{torch}norm2.weight"),
            Rule("qllama/query_tokens", "query_tokens")]
  return tuple(rules)


@functools.cache
def official_layout(cross_attention_frequency: int = 2) -> Layout:
  """The `InternVLModel` layout of an InternVL-G model with this cross-attention frequency."""
  llama_ignored = llama_layouts.LAYOUTS[llama_layouts.TRANSFORMERS].ignored
  return Layout(
      "InternVLModel (OpenGVLab)",
      prefixed(vit_layouts.LAYOUTS[vit_layouts.OFFICIAL].rules, "vision_model/", "vision_model.")
      + _qllama_rules(cross_attention_frequency)
      + _attention_pool_rules("clip_projector") + _attention_pool_rules("clip_projector2")
      + (Rule("text_projection", "text_projection"),  # stored [in, out]: used as x @ W
         Rule("logit_scale", "logit_scale"),
         Rule("itm_head/kernel", "itm_head.weight", Linear(1)),
         Rule("itm_head/bias", "itm_head.bias")),
      ignored=tuple(r"qllama\." + pattern for pattern in llama_ignored))


def config_json(config: InternVLConfig, *, allow_unofficial_sizes: bool = False) -> dict:
  """The config.json that the official `InternVLModel` reads.

  The official code hard-codes a vision width of 3200, 96 queries and the pools' LayerNorm eps
  1e-5, so other values are refused unless `allow_unofficial_sizes` (a checkpoint only this
  package reads, e.g. a tiny one for tests).
  """
  unofficial = [f"{name} {value} (official: {official})" for name, value, official in (
      ("vision width", config.vision.hidden_size, OFFICIAL_VISION_WIDTH),
      ("num_queries", config.num_queries, OFFICIAL_NUM_QUERIES),
      ("attn_pool_eps", config.attn_pool_eps, OFFICIAL_POOL_EPS)) if value != official]
  if unofficial and not allow_unofficial_sizes:
    raise ValueError(
        f"The official InternVLModel code hard-codes what this config changes: {', '.join(unofficial)}; "
        "it could not load the checkpoint. Pass allow_unofficial_sizes=True to write it anyway.")
  vision = {k: v for k, v in vit_layouts.config_json(config.vision, vit_layouts.OFFICIAL).items()
            if k not in ("architectures", "auto_map")}
  qllama = {k: v for k, v in llama_layouts.config_json(config.text).items() if k != "architectures"}
  qllama |= {"num_query_token": config.num_queries,
             "cross_attention_frequency": config.cross_attention_frequency}
  return {
      "architectures": ["InternVLModel"],
      "model_type": "internvl",
      # The official modeling files (from OpenGVLab's repository) are loaded as remote code.
      "auto_map": {"AutoConfig": "configuration_internvl.InternVLConfig",
                   "AutoModel": "modeling_internvl.InternVLModel"},
      "vision_config": vision,
      "qllama_config": qllama,
      "hidden_size": config.text.hidden_size,
      "clip_embed_dim": config.embed_dim,
      "attn_pool_num_heads": config.attn_pool_heads,
      "num_query_token": config.num_queries,
      "cross_attention_frequency": config.cross_attention_frequency,
      "label_smoothing": 0.0,
      "use_backbone_lora": 0,
      "use_qllama_lora": 0,
      "force_image_size": None,
      "initializer_range": 0.02,
      # The official loader ties lm_head to the embeddings unless the top level says otherwise.
      "tie_word_embeddings": config.text.tie_embeddings,
  }


def config_from_json(data: dict) -> InternVLConfig:
  """The InternVLConfig of an `InternVLModel` config.json."""
  try:
    for lora in ("use_backbone_lora", "use_qllama_lora"):
      if data.get(lora):
        raise ValueError(f"{lora}={data[lora]}: LoRA-wrapped checkpoints are not supported; merge "
                         "the adapters first.")
    vision = vit_layouts.config_from_json(data["vision_config"], vit_layouts.OFFICIAL)
    if data.get("force_image_size"):  # the reference resizes the position embedding at load
      vision = vision.replace(image_size=data["force_image_size"])
    qllama = data["qllama_config"]
    text = llama_layouts.config_from_json(qllama).replace(
        tie_embeddings=data.get("tie_word_embeddings", qllama.get("tie_word_embeddings", False)))
    # The top-level values are the ones the reference passes on to QLLaMA.
    return InternVLConfig(
        vision=vision, text=text, embed_dim=data.get("clip_embed_dim", 768),
        attn_pool_heads=data.get("attn_pool_num_heads", 16),
        num_queries=data.get("num_query_token", OFFICIAL_NUM_QUERIES),
        cross_attention_frequency=data.get("cross_attention_frequency", 2), variant="G")
  except KeyError as missing:
    raise ValueError(
        f"config.json lacks the field {missing} that an InternVLModel config has.") from None
