"""InternVL-Chat in OpenGVLab's `InternVLChatModel` and transformers'
`InternVLForConditionalGeneration` layouts, for each LLM family: bit-exact round trips, the key
sets of the reference code, logits against transformers and the family references, config.json
both ways, and named errors."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from internvl_jax.config import LLM_ARCHITECTURES, chat_preset, llama_preset
from internvl_jax.convert import chat_layouts, keymap, llm_layouts
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.convert.safetensors_io import SafetensorsFile
from internvl_jax.models import chat
from chat_fixtures import batch, export, import_, random_params, transformers_logits
from test_llm_families import (FAMILIES, LONG_FACTOR, SHORT_FACTOR, forward, mask_positions,
                               reference, reference_step)

OFFICIAL, TRANSFORMERS = chat_layouts.OFFICIAL, chat_layouts.TRANSFORMERS
TINY = chat_preset("tiny-v1.5", select_layer=-2)
# Tied embeddings and grouped-query attention.
TINY_TIED = chat_preset("tiny-v1.5", ps_version="v1", llm=llama_preset(
    "tiny", num_kv_heads=2, tie_embeddings=True))


@pytest.mark.parametrize("layout", [OFFICIAL, TRANSFORMERS])
def test_round_trip_is_bit_exact(layout, tmp_path):
  params = random_params(TINY)
  export(TINY, params, tmp_path, layout)
  loaded_config, loaded = import_(tmp_path)
  assert loaded_config == TINY
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_a_tied_llm_is_written_untied_to_the_official_layout(tmp_path):
  # The official config always unties (chat spec 2.6): the embedding is written as the head too.
  params = random_params(TINY_TIED)
  export(TINY_TIED, params, tmp_path, OFFICIAL)
  data = json.loads((tmp_path / "config.json").read_text())
  assert data["tie_word_embeddings"] is data["llm_config"]["tie_word_embeddings"] is False
  loaded_config, loaded = import_(tmp_path)
  assert loaded_config == TINY_TIED.replace(llm=TINY_TIED.llm.replace(tie_embeddings=False))
  llm = loaded.pop("language_model")
  np.testing.assert_array_equal(llm.pop("lm_head")["kernel"],
                                params["language_model"]["embed_tokens"]["embedding"].T)
  jax.tree.map(np.testing.assert_array_equal, loaded | {"language_model": llm}, params)
  # Before the official code untied llm_config too, a tied LLM could be saved without its head.
  written = SafetensorsFile(str(tmp_path / "model.safetensors"))
  safetensors.torch.save_file({key: torch.from_numpy(written.read(key)) for key in written.keys()
                               if key != "language_model.lm_head.weight"},
                              str(tmp_path / "model.safetensors"))
  data["llm_config"]["tie_word_embeddings"] = True
  (tmp_path / "config.json").write_text(json.dumps(data))
  loaded_config, loaded = import_(tmp_path)
  assert loaded_config == TINY_TIED
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _written_keys(directory) -> set[str]:
  return set(SafetensorsFile(os.path.join(directory, "model.safetensors")).keys())


def test_transformers_keys_are_what_save_pretrained_writes(tmp_path):
  export(TINY, random_params(TINY), tmp_path / "ours", TRANSFORMERS)
  hf_config = transformers.InternVLConfig(**chat_layouts.config_json(TINY, TRANSFORMERS))
  transformers.InternVLForConditionalGeneration(hf_config).save_pretrained(tmp_path / "theirs")
  assert _written_keys(tmp_path / "ours") == _written_keys(tmp_path / "theirs")
  assert "language_model.model.embed_tokens.weight" in _written_keys(tmp_path / "ours")
  assert hf_config.text_config.model_type == "llama"


def _spec_5_5_keys(vision_layers: int, llm_layers: int) -> set[str]:
  """Spec 5.5's InternVLChatModel keys with a LLaMA LLM and a LayerNorm ViT, written out."""
  vit_layer = ("attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight",
               "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
               "mlp.fc2.bias", "norm1.weight", "norm2.weight", "ls1", "ls2")
  keys = {f"vision_model.embeddings.{name}" for name in (
      "class_embedding", "patch_embedding.weight", "patch_embedding.bias", "position_embedding")}
  keys |= {f"vision_model.encoder.layers.{i}.{name}" for i in range(vision_layers)
           for name in vit_layer}
  keys |= {f"mlp1.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
  llm_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
      f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + [
      "input_layernorm.weight", "post_attention_layernorm.weight"]
  keys |= {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
           "language_model.lm_head.weight"}
  return keys | {f"language_model.model.layers.{i}.{name}" for i in range(llm_layers)
                 for name in llm_layer}


@pytest.mark.parametrize("config", [TINY, TINY_TIED], ids=["untied", "tied"])
def test_official_keys_are_spec_5_5s(config, tmp_path):
  export(config, random_params(config), tmp_path, OFFICIAL)
  assert _written_keys(tmp_path) == _spec_5_5_keys(2, 2)


def test_v1_5_shapes_at_full_size():
  config = chat_preset("v1.1-llama2-13b")
  plans = keymap.plan(chat_layouts.layout(config, OFFICIAL), chat.abstract_params(config))
  shapes = {tensor.key: tensor.torch_shape for tensor in plans}
  assert shapes["mlp1.0.weight"] == (12800,)
  assert shapes["mlp1.1.weight"] == (5120, 12800)
  assert shapes["mlp1.3.weight"] == (5120, 5120)
  assert shapes["vision_model.encoder.layers.47.attn.qkv.weight"] == (9600, 3200)
  assert shapes["language_model.model.embed_tokens.weight"] == (32003, 5120)
  assert shapes["language_model.lm_head.weight"] == (32003, 5120)


def test_official_config_json_is_what_the_official_code_reads():
  config = chat_preset("v1.1-llama2-13b")
  data = chat_layouts.config_json(config, OFFICIAL)
  assert data["architectures"] == ["InternVLChatModel"] and data["model_type"] == "internvl_chat"
  assert data["llm_config"]["architectures"] == ["LlamaForCausalLM"]  # picks the LLM class
  vision = data["vision_config"]
  assert (vision["num_hidden_layers"], vision["image_size"]) == (48, 448)
  assert (data["select_layer"], data["ps_version"], data["downsample_ratio"]) == (-4, "v1", 0.5)
  # The official conversation.py names our vicuna_v1 "vicuna_v1.1".
  assert (data["force_image_size"], data["template"]) == (448, "vicuna_v1.1")
  assert data["tie_word_embeddings"] is False
  assert chat_layouts.config_from_json(data, OFFICIAL) == config
  # Released config.json files do not name the <IMG_CONTEXT> id: the tokenizer does.
  released = {k: v for k, v in data.items() if k != "img_context_token_id"}
  with pytest.raises(ValueError, match="does not name the <IMG_CONTEXT> token id"):
    chat_layouts.config_from_json(released, OFFICIAL)
  assert chat_layouts.config_from_json(released, OFFICIAL, image_context_id=32002) == config
  with pytest.raises(ValueError, match="use_llm_lora=16: LoRA-wrapped checkpoints"):
    chat_layouts.config_from_json(data | {"use_llm_lora": 16}, OFFICIAL)
  internlm3 = data | {
      "llm_config": data["llm_config"] | {"architectures": ["InternLM3ForCausalLM"]}}
  with pytest.raises(ValueError, match="The LLM is InternLM3ForCausalLM; supported: "
                     "InternLM2ForCausalLM, LlamaForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM"):
    chat_layouts.config_from_json(internlm3, OFFICIAL)


# What the official chat() reads, none of it at its default (chat families spec 3.3).
CHAT_FIELDS = dict(template="internvl2_5", system_message="Be brief.", dynamic_image_size=True,
                   use_thumbnail=True, min_dynamic_patch=2, max_dynamic_patch=12)
CHAT_FIELD_NAMES = ("template", "system_message", "dynamic_image_size", "use_thumbnail",
                    "min_dynamic_patch", "max_dynamic_patch")


@pytest.mark.parametrize("layout", [OFFICIAL, TRANSFORMERS])
def test_chat_fields_round_trip(layout):
  config = TINY.replace(**CHAT_FIELDS)
  data = chat_layouts.config_json(config, layout)
  assert {name: data[name] for name in CHAT_FIELD_NAMES} == CHAT_FIELDS
  assert chat_layouts.config_from_json(data, layout) == config
  # No system message: the template's default, which the official model then uses.
  data = chat_layouts.config_json(TINY.replace(template="Hermes-2"), layout)
  assert "system_message" not in data and data["template"] == "Hermes-2"
  assert chat_layouts.config_from_json(data, layout) == TINY.replace(template="Hermes-2")


@pytest.mark.parametrize("layout", [OFFICIAL, TRANSFORMERS])
def test_config_json_without_chat_fields_gets_the_official_defaults(layout):
  data = chat_layouts.config_json(TINY.replace(**CHAT_FIELDS), layout)
  released = {k: v for k, v in data.items() if k not in CHAT_FIELD_NAMES}
  config = chat_layouts.config_from_json(released, layout)
  assert (config.template, config.system_message, config.dynamic_image_size, config.use_thumbnail,
          config.min_dynamic_patch, config.max_dynamic_patch) == (None, None, False, False, 1, 6)
  with pytest.raises(ValueError, match="template='chatml' is not one of"):
    chat_layouts.config_from_json(data | {"template": "chatml"}, layout)


def test_transformers_config_class_keeps_the_chat_fields(tmp_path):
  config = TINY.replace(**CHAT_FIELDS)
  hf_config = transformers.InternVLConfig(**chat_layouts.config_json(config, TRANSFORMERS))
  assert {name: hf_config.to_dict()[name] for name in CHAT_FIELD_NAMES} == CHAT_FIELDS
  hf_config.save_pretrained(tmp_path)
  reloaded = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()
  assert chat_layouts.config_from_json(reloaded, TRANSFORMERS) == config


def test_transformers_config_json_round_trip_and_refusals():
  data = chat_layouts.config_json(TINY, TRANSFORMERS)
  assert (data["image_token_id"], data["image_seq_length"]) == (127, 4)
  assert (data["vision_feature_layer"], data["vision_feature_select_strategy"]) == (-2, "default")
  assert data["text_config"]["model_type"] == "llama"
  assert chat_layouts.config_from_json(data, TRANSFORMERS) == TINY
  # The tile size follows image_seq_length, not the stored position embedding's.
  larger = chat_layouts.config_json(TINY.replace(image_size=48), TRANSFORMERS)
  assert chat_layouts.config_from_json(larger, TRANSFORMERS).image_size == 48
  for change, message in (
      ({"vision_feature_select_strategy": "full"}, "drops the CLS token"),
      ({"vision_feature_layer": [-1, -2]}, "selects several layers"),
      ({"text_config": data["text_config"] | {"model_type": "gemma"}},
       "The text model is 'gemma'; supported: llama, phi3, qwen2"),
      ({"projector_hidden_act": "silu"}, "projector_hidden_act 'silu'")):
    with pytest.raises(ValueError, match=message):
      chat_layouts.config_from_json(data | change, TRANSFORMERS)
  with pytest.raises(ValueError, match="lacks the field 'image_token_id'"):
    chat_layouts.config_from_json({k: v for k, v in data.items() if k != "image_token_id"},
                                  TRANSFORMERS)


def test_layouts_refuse_configs_their_code_cannot_run():
  with pytest.raises(ValueError, match=r"cannot hold .*variant 'v1.0'"):
    chat_layouts.config_json(chat_preset("tiny-v1.0"), OFFICIAL)
  with pytest.raises(ValueError, match=r"cannot hold .*ps_version 'v1' \(transformers"):
    chat_layouts.config_json(TINY_TIED, TRANSFORMERS)
  with pytest.raises(ValueError, match=r"projector_eps 1e-06"):
    chat_layouts.config_json(TINY.replace(projector_eps=1e-6), OFFICIAL)
  with pytest.raises(ValueError, match="Unknown layout 'llava'"):
    chat_layouts.config_json(TINY, "llava")


def test_mismatched_checkpoints_are_named(tmp_path):
  export(TINY, random_params(TINY), tmp_path, TRANSFORMERS)
  layout = chat_layouts.layout(TINY, TRANSFORMERS)
  source = SafetensorsFile(os.path.join(tmp_path, "model.safetensors"))
  plans = keymap.plan(layout, chat.abstract_params(TINY))
  keys = set(source.keys())
  check = lambda keys: keymap.check_source(layout, plans, keys, source.shape, source.dtype,
                                           allow_missing=False)
  check(keys | {"language_model.model.rotary_emb.inv_freq"})  # buffers some versions save
  with pytest.raises(keymap.ConversionError,
                     match="missing keys: multi_modal_projector.layer_norm.bias"):
    check(keys - {"multi_modal_projector.layer_norm.bias"})
  with pytest.raises(keymap.ConversionError, match="unexpected keys .*: mlp1.0.weight"):
    check(keys | {"mlp1.0.weight"})


def test_released_official_configs_take_the_context_id_from_added_tokens(tmp_path):
  params = random_params(TINY)
  export_pytorch(TINY, params, str(tmp_path), layout=OFFICIAL)
  config_path = tmp_path / "config.json"
  released = json.loads(config_path.read_text())
  released.pop("img_context_token_id")  # as OpenGVLab's config.json files are
  config_path.write_text(json.dumps(released))
  with pytest.raises(ValueError, match="added_tokens.json"):
    import_pytorch(str(tmp_path))
  (tmp_path / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": TINY.image_context_id}))
  loaded_config, loaded = import_pytorch(str(tmp_path))
  assert loaded_config == TINY
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# Each LLM family in both layouts (chat spec 2-4).

def _chat(family: str):
  return chat_preset("tiny-v1.5", llm=FAMILIES[family])


def test_each_official_llm_class_has_a_family():
  assert set(llm_layouts.FAMILIES) == set(LLM_ARCHITECTURES)


@pytest.mark.parametrize("family", ["llama", "internlm2-dynamic", "qwen2-tied-dynamic",
                                    "qwen2-untied", "phi3-longrope"])
def test_official_layout_holds_each_family_under_its_own_names(family, tmp_path):
  config = _chat(family)
  params = random_params(config)
  export(config, params, tmp_path, OFFICIAL)
  data = json.loads((tmp_path / "config.json").read_text())
  assert data["llm_config"]["architectures"] == [config.llm.architecture]
  # The LLM's keys are its reference class's own (chat spec 2), under `language_model.`.
  theirs = reference(family)
  llm_keys = {key for key in _written_keys(tmp_path) if key.startswith("language_model.")}
  assert llm_keys == {"language_model." + key for key in theirs.state_dict()}
  assert _written_keys(tmp_path) - llm_keys == _spec_5_5_keys(2, 2) - {
      key for key in _spec_5_5_keys(2, 2) if key.startswith("language_model.")}
  spelled = {"internlm2-dynamic": ["model.layers.1.attention.wqkv.weight", "output.weight"],
             "phi3-longrope": ["model.layers.1.self_attn.qkv_proj.weight",
                               "model.layers.1.mlp.gate_up_proj.weight"]}
  assert {"language_model." + key for key in spelled.get(family, [])} <= llm_keys
  if family == "phi3-longrope":  # InternVL's Phi-3 code takes exactly these three (chat spec 2.2)
    assert data["llm_config"]["rope_scaling"] == {"type": "su", "short_factor": list(SHORT_FACTOR),
                                                  "long_factor": list(LONG_FACTOR)}
  # The written LLM, loaded into the family's reference, gives our LLM's logits.
  written = SafetensorsFile(str(tmp_path / "model.safetensors"))
  theirs.load_state_dict({key.removeprefix("language_model."): torch.from_numpy(written.read(key))
                          for key in llm_keys}, strict=True)
  tokens, mask = batch(config, text=30)[2:]
  their_logits, _ = reference_step(theirs, tokens, mask, mask_positions(mask), None)
  ours = forward(config.llm, params["language_model"], tokens, mask).logits
  np.testing.assert_allclose(ours[mask], their_logits[mask], atol=1e-5, rtol=1e-5)
  loaded_config, loaded = import_(tmp_path)
  assert loaded_config == config.replace(llm=config.llm.replace(tie_embeddings=False))
  if config.llm.tie_embeddings:
    llm = params["language_model"]
    params = params | {"language_model": llm | {
        "lm_head": {"kernel": llm["embed_tokens"]["embedding"].T}}}
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("family, text_type", [
    ("llama", "llama"), ("internlm2-linear", "llama"), ("qwen2-tied-dynamic", "qwen2"),
    ("qwen2-untied", "qwen2"), ("phi3-longrope", "phi3")])
def test_transformers_layout_runs_each_family_in_transformers(family, text_type, tmp_path):
  config = _chat(family)
  params = random_params(config)
  export(config, params, tmp_path / "ours", TRANSFORMERS)
  theirs, info = transformers.InternVLForConditionalGeneration.from_pretrained(
      str(tmp_path / "ours"), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert theirs.config.text_config.model_type == text_type
  # 46 tokens: past the 32 positions where dynamic NTK and LongRoPE's long factors start.
  tiles, tile_count, tokens, mask = batch(config, text=30)
  their_logits = transformers_logits(theirs.eval(), tiles, tile_count, tokens, mask)
  ours = chat.InternVLChat(config).apply({"params": params}, tiles, tile_count, tokens, mask)
  np.testing.assert_allclose(ours[mask], their_logits[mask], atol=1e-5, rtol=1e-5)
  # What transformers writes back reads bit-exact; InternLM2 is held as LLaMA there.
  theirs.save_pretrained(tmp_path / "theirs")
  assert _written_keys(tmp_path / "theirs") == _written_keys(tmp_path / "ours")
  loaded_config, loaded = import_(tmp_path / "theirs")
  assert loaded_config == config.replace(llm=config.llm.replace(architecture={
      "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[
          text_type]))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # Older files hold the runtime names (`model.language_model.*`, `lm_head.weight`, ...).
  # (A tied head is saved as a copy, as torch.save keeps it.)
  state = {key: tensor.clone() for key, tensor in theirs.state_dict().items()}
  safetensors.torch.save_file(state, str(tmp_path / "theirs" / "model.safetensors"))
  assert "model.language_model.embed_tokens.weight" in _written_keys(tmp_path / "theirs")
  jax.tree.map(np.testing.assert_array_equal, import_(tmp_path / "theirs")[1], params)


def test_transformers_layout_refuses_internlm2s_dynamic_ntk():
  # InternLM2 keys it on the key length, transformers' llama on the positions.
  with pytest.raises(ValueError, match="no transformers LLaMA / Qwen2 equivalent"):
    chat_layouts.config_json(_chat("internlm2-dynamic"), TRANSFORMERS)


def test_a_file_with_both_spellings_of_a_key_is_refused(tmp_path):
  export(TINY, random_params(TINY), tmp_path, TRANSFORMERS)
  written = SafetensorsFile(str(tmp_path / "model.safetensors"))
  tensors = {key: torch.from_numpy(written.read(key)) for key in written.keys()}
  tensors["lm_head.weight"] = tensors["language_model.lm_head.weight"].clone()
  safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="holds language_model.lm_head.weight twice"):
    import_(tmp_path)
