"""InternVL-Chat with a LLaMA LLM in its two PyTorch layouts, with their config.json files:
OpenGVLab's `InternVLChatModel` (spec 5.5) and transformers' `InternVLForConditionalGeneration`
(spec 6).

Both hold the "v1.5" variant (pixel shuffle + `mlp1` with a LayerNorm); transformers' only with
pixel shuffle "v2". The tables reuse InternViT's and LLaMA's, prefixed: OpenGVLab nests the whole
`LlamaForCausalLM` under `language_model.`, transformers nests the bare `LlamaModel` under
`model.language_model.` and keeps `lm_head` at the top.

Both config.json files carry what the official chat() needs (template, system message, tiling)
under the official config's names; transformers' config class has no such fields and keeps them
as extra top-level keys through `save_pretrained` / `from_pretrained`.
"""

from internvl_jax.config import ChatConfig
from internvl_jax.convert import intern_vit_layouts as vit_layouts
from internvl_jax.convert import llama_layouts
from internvl_jax.convert.keymap import Layout, Linear, Rule, prefixed

OFFICIAL = "official"
TRANSFORMERS = "transformers"

_LLAMA = llama_layouts.LAYOUTS[llama_layouts.TRANSFORMERS]
# Both layouts' code: LayerNorm with PyTorch's default eps, exact GELU.
_PROJECTOR_EPS = 1e-5


def _projector_rules(torch_prefix: str, norm: str, linear_1: str,
                     linear_2: str) -> tuple[Rule, ...]:
  rules = [Rule("mlp1/norm/scale", f"{torch_prefix}{norm}.weight"),
           Rule("mlp1/norm/bias", f"{torch_prefix}{norm}.bias")]
  for flax_name, torch_name in (("linear_1", linear_1), ("linear_2", linear_2)):
    rules += [Rule(f"mlp1/{flax_name}/kernel", f"{torch_prefix}{torch_name}.weight", Linear(1)),
              Rule(f"mlp1/{flax_name}/bias", f"{torch_prefix}{torch_name}.bias")]
  return tuple(rules)


# Our template names that the official conversation.py spells differently.
_OFFICIAL_TEMPLATE_NAMES = {"vicuna_v1": "vicuna_v1.1"}
_TILING_FIELDS = ("dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch")


def _chat_fields_json(config: ChatConfig) -> dict:
  """The official chat()'s config.json fields; `system_message` only when set, as the official
  model reads it only if the config has it."""
  fields = {"template": _OFFICIAL_TEMPLATE_NAMES.get(config.template, config.template)}
  fields |= {name: getattr(config, name) for name in _TILING_FIELDS}
  if config.system_message is not None:
    fields["system_message"] = config.system_message
  return fields


def _chat_fields(data: dict) -> dict:
  """ChatConfig arguments from those fields; missing ones keep the official class's defaults."""
  official_names = {official: ours for ours, official in _OFFICIAL_TEMPLATE_NAMES.items()}
  fields = {name: data[name] for name in ("system_message", *_TILING_FIELDS) if name in data}
  template = data.get("template")
  return fields | {"template": official_names.get(template, template)}


def _transformers_llm_key(key: str) -> str:
  """LlamaForCausalLM's key inside InternVLForConditionalGeneration: `model.` becomes
  `model.language_model.`; `lm_head.weight` stays."""
  return "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key


LAYOUTS = {
    OFFICIAL: Layout(
        "InternVLChatModel (OpenGVLab)",
        prefixed(vit_layouts.LAYOUTS[vit_layouts.OFFICIAL].rules, "vision_model/", "vision_model.")
        + _projector_rules("mlp1.", "0", "1", "3")
        + prefixed(_LLAMA.rules, "language_model/", "language_model."),
        ignored=tuple(r"language_model\." + pattern for pattern in _LLAMA.ignored)),
    TRANSFORMERS: Layout(
        "InternVLForConditionalGeneration (transformers)",
        prefixed(vit_layouts.LAYOUTS[vit_layouts.TRANSFORMERS].rules, "vision_model/",
                 "model.vision_tower.")
        + _projector_rules("model.multi_modal_projector.", "layer_norm", "linear_1", "linear_2")
        + tuple(Rule("language_model/" + rule.flax, _transformers_llm_key(rule.torch),
                     rule.transform) for rule in _LLAMA.rules),
        ignored=(r"model\.language_model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                 r"model\.language_model\.rotary_emb\.inv_freq", r"lm_head\.weight")),
}
ARCHITECTURES = {"InternVLChatModel": OFFICIAL, "InternVLForConditionalGeneration": TRANSFORMERS}


def check_expressible(config: ChatConfig, layout: str) -> None:
  """Raises a ValueError naming what of `config` the layout's PyTorch code cannot express."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")
  problems = []
  if config.variant != "v1.5":
    problems.append(f"variant {config.variant!r} (only 'v1.5': pixel shuffle + mlp1)")
  if config.projector_eps != _PROJECTOR_EPS:
    problems.append(f"projector_eps {config.projector_eps} (the code uses {_PROJECTOR_EPS})")
  if layout == TRANSFORMERS and config.ps_version != "v2":
    problems.append(f"ps_version {config.ps_version!r} (transformers always swaps the grid back: "
                    "'v2')")
  if problems:
    raise ValueError(f"The {LAYOUTS[layout].name} layout cannot hold this InternVL-Chat config: "
                     f"{'; '.join(problems)}.")


def config_json(config: ChatConfig, layout: str) -> dict:
  """The config.json that the layout's PyTorch code reads."""
  check_expressible(config, layout)
  llm = llama_layouts.config_json(config.llm)
  if layout == OFFICIAL:
    vision = vit_layouts.config_json(config.vision, vit_layouts.OFFICIAL)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        # The official modeling files (from OpenGVLab's repository) are loaded as remote code.
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "vision_config": {k: v for k, v in vision.items() if k != "auto_map"},
        "llm_config": llm,  # its "architectures" picks the LLM class
        "select_layer": config.select_layer,
        "force_image_size": config.image_size,
        "downsample_ratio": config.downsample_ratio,
        "ps_version": config.ps_version,
        **_chat_fields_json(config),
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        # Not read by the official code (it asks the tokenizer for <IMG_CONTEXT>); kept so that
        # the checkpoint says which id its image features go to.
        "img_context_token_id": config.image_context_id,
        "tie_word_embeddings": config.llm.tie_embeddings,
    }
  vision = vit_layouts.config_json(config.vision, vit_layouts.TRANSFORMERS)
  return {
      "architectures": ["InternVLForConditionalGeneration"],
      "model_type": "internvl",
      "vision_config": {k: v for k, v in vision.items() if k != "architectures"},
      "text_config": {k: v for k, v in llm.items() if k != "architectures"},
      "image_token_id": config.image_context_id,
      "image_seq_length": config.num_image_tokens,
      "downsample_ratio": config.downsample_ratio,
      "projector_hidden_act": "gelu",
      "vision_feature_layer": config.select_layer,
      "vision_feature_select_strategy": "default",
      # transformers ties lm_head to the embeddings by this top-level flag (default true).
      "tie_word_embeddings": config.llm.tie_embeddings,
      **_chat_fields_json(config),
  }


def config_from_json(data: dict, layout: str, *, image_context_id: int | None = None) -> ChatConfig:
  """The ChatConfig of a config.json in the layout.

  The official config.json does not name the <IMG_CONTEXT> id (the official code asks the
  tokenizer); pass `image_context_id` when it lacks our `img_context_token_id`.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")
  try:
    if layout == OFFICIAL:
      return _official_config(data, image_context_id)
    return _transformers_config(data)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a {LAYOUTS[layout].name} "
                     "config has.") from None


def _official_config(data: dict, image_context_id: int | None) -> ChatConfig:
  for lora in ("use_backbone_lora", "use_llm_lora"):
    if data.get(lora):
      raise ValueError(f"{lora}={data[lora]}: LoRA-wrapped checkpoints are not supported; merge "
                       "the adapters first.")
  architectures = data["llm_config"].get("architectures") or ["?"]
  if architectures[0] != "LlamaForCausalLM":
    raise ValueError(f"The LLM is {architectures[0]}; only LlamaForCausalLM is supported.")
  image_context_id = data.get("img_context_token_id", image_context_id)
  if image_context_id is None:
    raise ValueError("config.json does not name the <IMG_CONTEXT> token id (the official code "
                     "takes it from the tokenizer): put the tokenizer's added_tokens.json next to "
                     "it, or pass image_context_id.")
  vision = vit_layouts.config_from_json(data["vision_config"], vit_layouts.OFFICIAL)
  llm = llama_layouts.config_from_json(data["llm_config"])
  return ChatConfig(
      vision=vision, llm=llm, variant="v1.5",
      image_size=data.get("force_image_size") or vision.image_size,
      select_layer=data.get("select_layer", -1), downsample_ratio=data.get("downsample_ratio", 0.5),
      ps_version=data.get("ps_version", "v1"), projector_eps=_PROJECTOR_EPS,
      image_context_id=image_context_id, **_chat_fields(data))


def _transformers_config(data: dict) -> ChatConfig:
  text = data["text_config"]
  if text.get("model_type", "llama") != "llama":
    raise ValueError(f"The text model is {text['model_type']!r}; only 'llama' is supported.")
  strategy = data.get("vision_feature_select_strategy", "default")
  if strategy != "default":
    raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (InternVL-Chat "
                     "drops the CLS token: 'default').")
  if data.get("projector_hidden_act", "gelu") != "gelu":
    raise ValueError(f"projector_hidden_act {data['projector_hidden_act']!r} is not supported "
                     "(InternVL-Chat uses 'gelu').")
  layer = data.get("vision_feature_layer", -1)
  if not isinstance(layer, int):
    raise ValueError(f"vision_feature_layer {layer} selects several layers; only one is supported.")
  vision = vit_layouts.config_from_json(data["vision_config"], vit_layouts.TRANSFORMERS)
  llm = llama_layouts.config_from_json(text).replace(
      tie_embeddings=data.get("tie_word_embeddings", True))
  ratio = data.get("downsample_ratio", 0.5)
  # The tile size is what gives `image_seq_length` tokens: (size / patch * ratio)^2.
  image_size = vision.image_size
  if "image_seq_length" in data:
    image_size = round(data["image_seq_length"]**0.5 / ratio) * vision.patch_size
  return ChatConfig(vision=vision, llm=llm, variant="v1.5", image_size=image_size,
                    select_layer=layer, downsample_ratio=ratio, ps_version="v2",
                    projector_eps=_PROJECTOR_EPS, image_context_id=data["image_token_id"],
                    **_chat_fields(data))
