"""The models a checkpoint can hold and the PyTorch formats each is read from and written to.

A `Format` ties a config.json `architectures` entry to a model kind, its key-map layout and its
config.json mapping; the converters and `load_pretrained` look formats up here and nowhere else.
"""

import dataclasses
import functools
import typing
from typing import Any, Callable

from internvl_jax.config import ChatConfig, InternVLConfig, LlamaConfig, VisionConfig
from internvl_jax.convert import chat_layouts, intern_vit_layouts, internvl_layouts, llama_layouts
from internvl_jax.convert.keymap import Layout
from internvl_jax.models import chat, intern_vit, internvl, llama


@dataclasses.dataclass(frozen=True)
class ModelKind:
  name: str
  config_type: type
  abstract_params: Callable[[Any], dict]
  init_params: Callable[..., dict]
  variant: str | None = None  # the InternVLConfig.variant of the kind, for InternVL-C and -G


MODELS = {
    "intern_vit": ModelKind("intern_vit", VisionConfig, intern_vit.abstract_params,
                            intern_vit.init_params),
    "llama": ModelKind("llama", LlamaConfig, llama.abstract_params, llama.init_params),
    "internvl_c": ModelKind("internvl_c", InternVLConfig, internvl.abstract_params,
                            internvl.init_params, variant="C"),
    # InternVL-14B holds InternVL-C and -G in one set of params: the G variant's.
    "internvl_g": ModelKind("internvl_g", InternVLConfig, internvl.abstract_params,
                            internvl.init_params, variant="G"),
    "internvl_chat": ModelKind("internvl_chat", ChatConfig, chat.abstract_params, chat.init_params),
}


@dataclasses.dataclass(frozen=True)
class Format:
  model: str  # a MODELS key
  name: str  # what --format says: "official" or "transformers"
  architecture: str  # config.json "architectures"
  layout: Callable[[Any], Layout]  # config -> key map
  # (config, strict) -> config.json; strict refuses sizes the format's own code cannot load.
  config_json: Callable[[Any, bool], dict]
  config_from_json: Callable[[dict], Any]
  key_prefixes: tuple[str, ...] = ()  # where the model may sit inside a larger checkpoint


def _vit(name: str, architecture: str) -> Format:
  return Format("intern_vit", name, architecture,
                lambda config: intern_vit_layouts.LAYOUTS[name],
                lambda config, strict: intern_vit_layouts.config_json(config, name),
                functools.partial(intern_vit_layouts.config_from_json, layout=name),
                intern_vit_layouts.KEY_PREFIXES[name])


FORMATS = (
    _vit(intern_vit_layouts.OFFICIAL, "InternVisionModel"),
    _vit(intern_vit_layouts.TRANSFORMERS, "InternVLVisionModel"),
    *(Format("llama", name, architecture, lambda config, name=name: llama_layouts.LAYOUTS[name],
             lambda config, strict, name=name: llama_layouts.config_json(config, name),
             functools.partial(llama_layouts.config_from_json, layout=name))
      for architecture, name in llama_layouts.ARCHITECTURES.items()),
    *(Format("internvl_chat", name, architecture, lambda config, name=name: chat_layouts.LAYOUTS[name],
             lambda config, strict, name=name: chat_layouts.config_json(config, name),
             functools.partial(chat_layouts.config_from_json, layout=name))
      for architecture, name in chat_layouts.ARCHITECTURES.items()),
    Format("internvl_g", "official", "InternVLModel",
           lambda config: internvl_layouts.official_layout(config.cross_attention_frequency),
           lambda config, strict: internvl_layouts.config_json(config, allow_unofficial_sizes=not strict),
           internvl_layouts.config_from_json),
)


def detect(config_data: dict) -> Format:
  """The format of a PyTorch checkpoint directory, from its config.json."""
  names = config_data.get("architectures") or ()
  for fmt in FORMATS:
    if fmt.architecture in names:
      return fmt
  raise ValueError(
      f"config.json names architectures {list(names)} (model_type {config_data.get('model_type')!r}); "
      f"supported: {sorted(f.architecture for f in FORMATS)}.")


def find(model: str, name: str) -> Format:
  """The format `name` of a model kind, e.g. ("intern_vit", "transformers")."""
  for fmt in FORMATS:
    if (fmt.model, fmt.name) == (model, name):
      return fmt
  known = sorted(f.name for f in FORMATS if f.model == model)
  raise ValueError(f"A {model} model has no {name!r} PyTorch format; it has: {known}.")


def model_kind(config) -> ModelKind:
  for kind in MODELS.values():
    if isinstance(config, kind.config_type) and (kind.variant is None or
                                                 kind.variant == config.variant):
      return kind
  raise ValueError(f"No model kind takes a {type(config).__name__}.")


def config_to_json(config) -> dict:
  """{"model": kind, "config": the config's fields, nested configs as dicts}."""
  return {"model": model_kind(config).name, "config": dataclasses.asdict(config)}


def config_from_json(data: dict):
  """The config `config_to_json` wrote. An InternVL kind sets the config's variant: older files
  hold no variant, and the user names their kind (see the error)."""
  name = data.get("model")
  if name == "internvl":
    raise ValueError('The checkpoint says "model": "internvl", written before the kind named '
                     'InternVL-C or -G: set it to "internvl_c" if the params have a `text_model` '
                     'tower (stage 1), "internvl_g" if they have `qllama` (stage 2).')
  if name not in MODELS:
    raise ValueError(f"Checkpoint holds a {name!r} model; known: {sorted(MODELS)}.")
  kind, values = MODELS[name], data["config"]
  if kind.variant is not None:
    if values.get("variant", kind.variant) != kind.variant:
      raise ValueError(f"The checkpoint's kind {name!r} and its config's variant "
                       f"{values['variant']!r} disagree.")
    values = {**values, "variant": kind.variant}
  return _dataclass_from_dict(kind.config_type, values)


def _dataclass_from_dict(cls, values: dict):
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"The checkpoint's {cls.__name__} has fields this version does not know: "
                     f"{unknown}.")
  fields = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue  # a field added since the checkpoint was written keeps its default
    value = values[field.name]
    # A nested config, possibly optional (`QLlamaConfig | None`).
    nested = [t for t in typing.get_args(hints[field.name]) or (hints[field.name],)
              if dataclasses.is_dataclass(t)]
    if nested and isinstance(value, dict):
      value = _dataclass_from_dict(nested[0], value)
    elif isinstance(value, list):
      value = tuple(value)
    fields[field.name] = value
  return cls(**fields)
