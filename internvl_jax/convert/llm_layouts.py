"""The LLM families of InternVL-Chat (chat spec 2) by the class that config.json's `architectures`
names, which is also `LlamaConfig.architecture`: each family's key map and config.json both ways,
as a bare LLM checkpoint and inside the two chat layouts.
"""

import dataclasses
import functools
from typing import Callable

from internvl_jax.config import LlamaConfig
from internvl_jax.convert import internlm2_layouts, llama_layouts
from internvl_jax.convert.keymap import Layout


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # the bare LLM's --format name
  layout: Callable[[LlamaConfig], Layout]
  config_json: Callable[[LlamaConfig], dict]
  config_from_json: Callable[[dict], LlamaConfig]
  # The llm_config that InternVL's official code reads, where its own copy of the family's code
  # spells config.json differently from transformers.
  official_config_json: Callable[[LlamaConfig], dict]
  # The llama_layouts layout of the text model inside transformers' InternVL: InternLM2 is held
  # as LLaMA there, wqkv split, as transformers' own converter writes it (chat spec 4.3).
  transformers_text: str


def _transformers(name: str, official_config_json=None) -> Family:
  config_json = functools.partial(llama_layouts.config_json, layout=name)
  return Family(name, lambda config: llama_layouts.LAYOUTS[name], config_json,
                functools.partial(llama_layouts.config_from_json, layout=name),
                official_config_json or config_json, name)


FAMILIES = {
    "LlamaForCausalLM": _transformers(llama_layouts.TRANSFORMERS),
    internlm2_layouts.ARCHITECTURE: Family(
        internlm2_layouts.OFFICIAL, internlm2_layouts.layout, internlm2_layouts.config_json,
        internlm2_layouts.config_from_json, internlm2_layouts.config_json,
        llama_layouts.TRANSFORMERS),
    "Qwen2ForCausalLM": _transformers(llama_layouts.QWEN2),
    "Phi3ForCausalLM": _transformers(llama_layouts.PHI3, llama_layouts.internvl_phi3_config_json),
}


def family(architecture: str) -> Family:
  """The family of an `architectures` entry; refuses the LLMs InternVL-Chat's code has not."""
  if architecture not in FAMILIES:
    raise ValueError(f"The LLM is {architecture}; supported: {', '.join(sorted(FAMILIES))}.")
  return FAMILIES[architecture]
