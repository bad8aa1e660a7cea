"""InternVL-Chat in its two PyTorch layouts, with their config.json files: OpenGVLab's
`InternVLChatModel` (spec 5.5, chat spec 3) and transformers' `InternVLForConditionalGeneration`
(spec 6, chat spec 4), each holding any LLM family of llm_layouts.

Both hold the "v1.5" variant (pixel shuffle + `mlp1` with a LayerNorm); transformers' only with
pixel shuffle "v2". The tables are InternViT's, the projector's and the LLM family's, prefixed.
OpenGVLab nests the family's whole causal LM under `language_model.` (InternLM2 with its fused
`wqkv` and `output` head, Phi-3 with its fused `qkv_proj` / `gate_up_proj`), its config.json as
`llm_config`, whose `architectures` picks the class; the official config always unties the head,
so a tied LLM is written with its embedding as an explicit head, and read back untied. transformers
holds a text model of its own types: LLaMA and InternLM2 as `llama` (InternLM2 renamed, `wqkv`
split, as its converter writes them), Qwen2 as `qwen2`, Phi-3 as `phi3`; the keys are those
`save_pretrained` writes (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.*`, `multi_modal_projector.*`), and the runtime names of older files
(`model.language_model.*`, ...) are read as those. InternLM2's dynamic NTK keys on the key length,
transformers' llama on the positions: such an LLM is refused there; replacing its scaling by the
positions-keyed one converts it as transformers' converter does, changing the model past
max_position_embeddings.

Both config.json files carry what the official chat() needs (template, system message, tiling)
under the official config's names; transformers' config class has no such fields and keeps them
as extra top-level keys through `save_pretrained` / `from_pretrained`.
"""

import dataclasses

from internvl_jax.config import ChatConfig
from internvl_jax.convert import intern_vit_layouts as vit_layouts
from internvl_jax.convert import llama_layouts, llm_layouts
from internvl_jax.convert.keymap import Layout, Linear, Rule, Same, prefixed

OFFICIAL = "official"
TRANSFORMERS = "transformers"
NAMES = {OFFICIAL: "InternVLChatModel (OpenGVLab)",
         TRANSFORMERS: "InternVLForConditionalGeneration (transformers)"}
ARCHITECTURES = {"InternVLChatModel": OFFICIAL, "InternVLForConditionalGeneration": TRANSFORMERS}
# (runtime prefix, the prefix save_pretrained writes): transformers' checkpoint conversion mapping
# for the files that older versions saved with the runtime names.
KEY_RENAMES = {TRANSFORMERS: (("model.language_model.", "language_model.model."),
                              ("lm_head.", "language_model.lm_head."),
                              ("model.vision_tower.", "vision_tower."),
                              ("model.multi_modal_projector.", "multi_modal_projector."))}
_TEXT_LAYOUTS = {model_type: name for name, model_type in llama_layouts.MODEL_TYPES.items()}
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


def _llm_layout(config: ChatConfig, name: str, untie: bool) -> Layout:
  """The LLM's table in the layout, unprefixed; `untie` writes a tied LLM's embedding as its head
  too."""
  family = llm_layouts.family(config.llm.architecture)
  if name == TRANSFORMERS:
    return llama_layouts.LAYOUTS[family.transformers_text]
  llm = family.layout(config.llm)
  if not (untie and config.llm.tie_embeddings):
    return llm
  head = next(rule for rule in llm.rules if rule.flax == "lm_head/kernel")
  return dataclasses.replace(llm, rules=llm.rules + (Rule("embed_tokens/embedding", head.torch,
                                                          Same()),))


# Per layout: InternViT's layout and the prefix it sits under; the projector's prefix and the names
# of its LayerNorm and two Linears.
_PARTS = {OFFICIAL: (vit_layouts.OFFICIAL, "vision_model.", ("mlp1.", "0", "1", "3")),
          TRANSFORMERS: (vit_layouts.TRANSFORMERS, "vision_tower.",
                         ("multi_modal_projector.", "layer_norm", "linear_1", "linear_2"))}


def layout(config: ChatConfig, name: str, *, untie: bool = False) -> Layout:
  """The key map of the layout `name` for the config's LLM family."""
  _check_layout(name)
  vision, vision_prefix, projector = _PARTS[name]
  llm = _llm_layout(config, name, untie)
  return Layout(NAMES[name], prefixed(vit_layouts.LAYOUTS[vision].rules, "vision_model/",
                                      vision_prefix)
                + _projector_rules(*projector)
                + prefixed(llm.rules, "language_model/", "language_model."),
                ignored=tuple(r"language_model\." + pattern for pattern in llm.ignored))


def export_layout(config: ChatConfig, name: str) -> Layout:
  """The key map that writes the layout: the official config unties (chat spec 2.6), so a tied
  LLM's head is written from its embedding, while a tied official checkpoint (from before the
  official code untied `llm_config` too) is read without one, as the official code does."""
  return layout(config, name, untie=name == OFFICIAL)


def _check_layout(name: str) -> None:
  if name not in NAMES:
    raise ValueError(f"Unknown layout {name!r}; known: {sorted(NAMES)}.")


def check_expressible(config: ChatConfig, layout: str) -> None:
  """Raises a ValueError naming what of `config` the layout's PyTorch code cannot express."""
  _check_layout(layout)
  problems = []
  if config.variant != "v1.5":
    problems.append(f"variant {config.variant!r} (only 'v1.5': pixel shuffle + mlp1)")
  if config.projector_eps != _PROJECTOR_EPS:
    problems.append(f"projector_eps {config.projector_eps} (the code uses {_PROJECTOR_EPS})")
  if layout == TRANSFORMERS and config.ps_version != "v2":
    problems.append(f"ps_version {config.ps_version!r} (transformers always swaps the grid back: "
                    "'v2')")
  if problems:
    raise ValueError(f"The {NAMES[layout]} layout cannot hold this InternVL-Chat config: "
                     f"{'; '.join(problems)}.")


def config_json(config: ChatConfig, layout: str) -> dict:
  """The config.json that the layout's PyTorch code reads."""
  check_expressible(config, layout)
  family = llm_layouts.family(config.llm.architecture)
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
        # Its "architectures" picks the LLM class; the official config unties the head.
        "llm_config": family.official_config_json(config.llm.replace(tie_embeddings=False)),
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
        "tie_word_embeddings": False,
    }
  vision = vit_layouts.config_json(config.vision, vit_layouts.TRANSFORMERS)
  text = llama_layouts.config_json(config.llm, family.transformers_text)
  return {
      "architectures": ["InternVLForConditionalGeneration"],
      "model_type": "internvl",
      "vision_config": {k: v for k, v in vision.items() if k != "architectures"},
      "text_config": {k: v for k, v in text.items() if k != "architectures"},
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
  _check_layout(layout)
  try:
    if layout == OFFICIAL:
      return _official_config(data, image_context_id)
    return _transformers_config(data)
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a {NAMES[layout]} "
                     "config has.") from None


def _official_config(data: dict, image_context_id: int | None) -> ChatConfig:
  for lora in ("use_backbone_lora", "use_llm_lora"):
    if data.get(lora):
      raise ValueError(f"{lora}={data[lora]}: LoRA-wrapped checkpoints are not supported; merge "
                       "the adapters first.")
  # The official config class dispatches on the first entry (chat spec 3.3).
  family = llm_layouts.family((data["llm_config"].get("architectures") or ["no architecture"])[0])
  image_context_id = data.get("img_context_token_id", image_context_id)
  if image_context_id is None:
    raise ValueError("config.json does not name the <IMG_CONTEXT> token id (the official code "
                     "takes it from the tokenizer): put the tokenizer's added_tokens.json next to "
                     "it, or pass image_context_id.")
  vision = vit_layouts.config_from_json(data["vision_config"], vit_layouts.OFFICIAL)
  llm = family.config_from_json(data["llm_config"])
  return ChatConfig(
      vision=vision, llm=llm, variant="v1.5",
      image_size=data.get("force_image_size") or vision.image_size,
      select_layer=data.get("select_layer", -1), downsample_ratio=data.get("downsample_ratio", 0.5),
      ps_version=data.get("ps_version", "v1"), projector_eps=_PROJECTOR_EPS,
      image_context_id=image_context_id, **_chat_fields(data))


def _transformers_config(data: dict) -> ChatConfig:
  text = data["text_config"]
  model_type = text.get("model_type", "qwen2")  # transformers' InternVLConfig's default
  if model_type not in _TEXT_LAYOUTS:
    raise ValueError(f"The text model is {model_type!r}; supported: "
                     f"{', '.join(sorted(_TEXT_LAYOUTS))}.")
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
  llm = llama_layouts.config_from_json(text, _TEXT_LAYOUTS[model_type]).replace(
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
