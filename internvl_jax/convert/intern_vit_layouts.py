"""InternViT in the two PyTorch layouts: OpenGVLab's `InternVisionModel` (spec 5.1) and
transformers' `InternVLVisionModel` (spec 6), with their config.json files."""

from internvl_jax.config import VisionConfig
from internvl_jax.convert.keymap import Conv, Flatten, Layout, Linear, Rule, Same

OFFICIAL = "official"
TRANSFORMERS = "transformers"

_SAME = Same()
_LAYER_OFFICIAL = "encoder.layers.{layer}."
_LAYER_HF = "encoder.layer.{layer}."

# Flax path, transform, official key, transformers key (None: the layout splits or lacks it).
_TABLE = (
    ("embeddings/cls_token", _SAME, "embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings/pos_embed", _SAME, "embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings/patch_embed/kernel", Conv(), "embeddings.patch_embedding.weight",
     "embeddings.patch_embeddings.projection.weight"),
    ("embeddings/patch_embed/bias", _SAME, "embeddings.patch_embedding.bias",
     "embeddings.patch_embeddings.projection.bias"),
    ("blocks/attn/qkv/kernel", Linear(1), "attn.qkv.weight", None),
    ("blocks/attn/qkv/bias", Flatten(), "attn.qkv.bias", None),
    ("blocks/attn/q_norm/scale", _SAME, "attn.q_norm.weight", "attention.q_norm.weight"),
    ("blocks/attn/k_norm/scale", _SAME, "attn.k_norm.weight", "attention.k_norm.weight"),
    ("blocks/attn/proj/kernel", Linear(2), "attn.proj.weight", "attention.projection_layer.weight"),
    ("blocks/attn/proj/bias", _SAME, "attn.proj.bias", "attention.projection_layer.bias"),
    ("blocks/mlp/fc1/kernel", Linear(1), "mlp.fc1.weight", "mlp.fc1.weight"),
    ("blocks/mlp/fc1/bias", _SAME, "mlp.fc1.bias", "mlp.fc1.bias"),
    ("blocks/mlp/fc2/kernel", Linear(1), "mlp.fc2.weight", "mlp.fc2.weight"),
    ("blocks/mlp/fc2/bias", _SAME, "mlp.fc2.bias", "mlp.fc2.bias"),
    ("blocks/norm1/scale", _SAME, "norm1.weight", "layernorm_before.weight"),
    ("blocks/norm1/bias", _SAME, "norm1.bias", "layernorm_before.bias"),
    ("blocks/norm2/scale", _SAME, "norm2.weight", "layernorm_after.weight"),
    ("blocks/norm2/bias", _SAME, "norm2.bias", "layernorm_after.bias"),
    ("blocks/ls1", _SAME, "ls1", "lambda_1"),
    ("blocks/ls2", _SAME, "ls2", "lambda_2"),
)

# transformers splits the fused qkv projection into q_proj, k_proj and v_proj.
_HF_SPLIT_QKV = tuple(
    Rule(f"blocks/attn/qkv/{param}", f"{_LAYER_HF}attention.{name}_proj.{torch_param}",
         transform, part=(axis, index))
    for index, name in enumerate("qkv")
    for param, torch_param, transform, axis in (("kernel", "weight", Linear(1), 1),
                                                 ("bias", "bias", Flatten(), 0)))


def _rules(column: int, layer_prefix: str) -> tuple[Rule, ...]:
  rules = []
  for flax_path, transform, *keys in _TABLE:
    key = keys[column]
    if key is not None:
      prefix = layer_prefix if flax_path.startswith("blocks/") else ""
      rules.append(Rule(flax_path, prefix + key, transform))
  return tuple(rules)


LAYOUTS = {
    OFFICIAL: Layout("InternVisionModel (OpenGVLab)", _rules(0, _LAYER_OFFICIAL)),
    TRANSFORMERS: Layout("InternVLVisionModel (transformers)", _rules(1, _LAYER_HF) + _HF_SPLIT_QKV),
}
# Prefixes under which the vision tower sits inside larger checkpoints.
KEY_PREFIXES = {OFFICIAL: ("vision_model.",), TRANSFORMERS: ("model.vision_tower.", "vision_tower.")}
ARCHITECTURES = {"InternVisionModel": OFFICIAL, "InternVLVisionModel": TRANSFORMERS}


def config_json(config: VisionConfig, layout: str) -> dict:
  """The config.json that the layout's PyTorch code reads."""
  if layout == OFFICIAL:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        # The official modeling files (from OpenGVLab's repository) are loaded as remote code.
        "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                     "AutoModel": "modeling_intern_vit.InternVisionModel"},
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_dim,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "qk_normalization": config.qk_norm,
        "norm_type": config.norm_type,
        "hidden_act": "gelu",
        "layer_norm_eps": config.norm_eps,
        "initializer_factor": config.layerscale_init,
        "initializer_range": 0.02,
        "drop_path_rate": config.drop_path_rate,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "use_flash_attn": False,
    }
  if layout == TRANSFORMERS:
    return {
        "architectures": ["InternVLVisionModel"],
        "model_type": "internvl_vision",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_dim,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "image_size": [config.image_size, config.image_size],
        "patch_size": [config.patch_size, config.patch_size],
        "num_channels": config.num_channels,
        "attention_bias": config.qkv_bias,
        "use_qk_norm": config.qk_norm,
        "norm_type": config.norm_type,
        "hidden_act": "gelu",
        "layer_norm_eps": config.norm_eps,
        "layer_scale_init_value": config.layerscale_init,
        "use_mean_pooling": True,  # no final norm, as InternViT
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "initializer_range": 0.02,
    }
  raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")


def config_from_json(data: dict, layout: str) -> VisionConfig:
  """The VisionConfig of a PyTorch checkpoint's config.json."""
  try:
    common = dict(hidden_size=data["hidden_size"], mlp_dim=data["intermediate_size"],
                  num_heads=data["num_attention_heads"], num_layers=data["num_hidden_layers"],
                  num_channels=data.get("num_channels", 3), norm_type=data.get("norm_type", "rms_norm"),
                  norm_eps=data.get("layer_norm_eps", 1e-6))
    if data.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (InternViT uses 'gelu').")
    if layout == OFFICIAL:
      return VisionConfig(**common, image_size=data["image_size"], patch_size=data["patch_size"],
                          qkv_bias=data["qkv_bias"], qk_norm=data["qk_normalization"],
                          layerscale_init=data.get("initializer_factor", 0.1),
                          drop_path_rate=data.get("drop_path_rate", 0.0))
    if layout == TRANSFORMERS:
      image_size, patch_size = _square(data["image_size"]), _square(data["patch_size"])
      if not data.get("use_mean_pooling", True):
        raise ValueError("use_mean_pooling=False adds a final LayerNorm that InternViT does not have.")
      return VisionConfig(**common, image_size=image_size, patch_size=patch_size,
                          qkv_bias=data.get("attention_bias", False), qk_norm=data.get("use_qk_norm", False),
                          layerscale_init=data.get("layer_scale_init_value", 0.1))
  except KeyError as missing:
    raise ValueError(f"config.json lacks the field {missing} that a {layout} InternViT config has.") from None
  raise ValueError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}.")


def _square(size) -> int:
  if isinstance(size, int):
    return size
  if len(size) != 2 or size[0] != size[1]:
    raise ValueError(f"Only square image and patch sizes are supported, got {size}.")
  return size[0]
