"""InternVL-G in the official `InternVLModel` layout: bit-exact round trips, the key set and shapes
of spec 5.4, the pair-scanned QLLaMA layers, and the config.json the official code reads."""

import os

import jax
import numpy as np
import pytest

from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.convert import internvl_layouts, keymap
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.convert.safetensors_io import SafetensorsFile
from internvl_jax.models.internvl import abstract_params, init_params

TINY = internvl_preset("tiny", vision=vision_preset("tiny", hidden_size=48, mlp_dim=96),
                       text=llama_preset("tiny", num_layers=4))


def _export(config, params, directory):
  return export_pytorch(config, params, str(directory), layout="official", strict=False)


def _import(directory):
  config, params = import_pytorch(str(directory))
  return config, params, SafetensorsFile(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32),
                        init_params(TINY))
  directory = tmp_path_factory.mktemp("internvl_g")
  _export(TINY, params, directory)
  return params, directory


def test_round_trip_is_bit_exact(exported):
  params, directory = exported
  config, loaded, _ = _import(directory)
  assert config == TINY
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _spec_keys(vision_layers: int, text_layers: int, frequency: int = 2) -> set[str]:
  """Spec 5.4's key list, written out."""
  vit_layer = ("attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight",
               "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
               "norm1.weight", "norm2.weight", "ls1", "ls2")
  keys = {f"vision_model.embeddings.{name}" for name in (
      "class_embedding", "patch_embedding.weight", "patch_embedding.bias", "position_embedding")}
  keys |= {f"vision_model.encoder.layers.{i}.{name}" for i in range(vision_layers) for name in vit_layer}
  llama_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
      f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + [
      "input_layernorm.weight", "post_attention_layernorm.weight"]
  cross_layer = [f"cross_attn.{p}_proj.weight" for p in "qkvo"] + ["cross_attn.norm1.weight",
                                                                   "cross_attn.norm2.weight"]
  keys |= {"qllama.model.embed_tokens.weight", "qllama.model.norm.weight", "qllama.lm_head.weight"}
  keys |= {f"qllama.model.layers.{i}.{name}" for i in range(text_layers) for name in llama_layer}
  keys |= {f"qllama.model.layers.{i}.{name}" for i in range(0, text_layers, frequency)
           for name in cross_layer}
  keys |= {"query_tokens", "text_projection", "logit_scale", "itm_head.weight", "itm_head.bias"}
  for pool in ("clip_projector", "clip_projector2"):
    keys |= {f"{pool}.norm1_{s}.{p}" for s in "qkv" for p in ("weight", "bias")}
    keys |= {f"{pool}.cross_attn.{s}.weight" for s in "qkv"}
    keys |= {f"{pool}.cross_attn.{s}_bias" for s in "qkv"}
    keys |= {f"{pool}.cross_attn.proj.weight", f"{pool}.cross_attn.proj.bias"}
  return keys


def test_written_keys_are_spec_5_4s(exported):
  _, directory = exported
  written = set(SafetensorsFile(os.path.join(directory, "model.safetensors")).keys())
  assert written == _spec_keys(vision_layers=2, text_layers=4)
  assert "qllama.model.layers.1.cross_attn.q_proj.weight" not in written


def test_internvl_14b_keys_and_shapes_are_the_released_ones():
  config = internvl_preset("14b-224")
  plans = keymap.plan(internvl_layouts.official_layout(), abstract_params(config))
  shapes = {tensor.key: tensor.torch_shape for tensor in plans}
  assert set(shapes) == _spec_keys(vision_layers=48, text_layers=32) and len(shapes) == 1048
  expected = {
      "vision_model.embeddings.position_embedding": (1, 257, 3200),
      "qllama.model.embed_tokens.weight": (49954, 4096),
      "qllama.model.layers.31.mlp.down_proj.weight": (4096, 11008),
      "qllama.model.layers.30.cross_attn.q_proj.weight": (4096, 4096),
      "qllama.model.layers.30.cross_attn.k_proj.weight": (4096, 3200),
      "qllama.model.layers.30.cross_attn.v_proj.weight": (4096, 3200),
      "qllama.model.layers.30.cross_attn.o_proj.weight": (4096, 4096),
      "qllama.model.layers.30.cross_attn.norm1.weight": (4096,),
      "qllama.model.layers.30.cross_attn.norm2.weight": (3200,),
      "qllama.lm_head.weight": (49954, 4096),
      "query_tokens": (1, 96, 4096),
      "text_projection": (4096, 768),
      "logit_scale": (),
      "clip_projector.cross_attn.k.weight": (3200, 3200),
      "clip_projector.cross_attn.k_bias": (3200,),
      "clip_projector.cross_attn.proj.weight": (768, 3200),
      "clip_projector2.norm1_v.bias": (4096,),
      "clip_projector2.cross_attn.proj.weight": (768, 4096),
      "itm_head.weight": (2, 4096),
      "itm_head.bias": (2,),
  }
  assert {key: shapes[key] for key in expected} == expected


def test_stacked_slices_map_to_every_fth_layer():
  config = TINY.replace(text=TINY.text.replace(num_layers=6), cross_attention_frequency=3)
  plans = keymap.plan(internvl_layouts.official_layout(3), abstract_params(config))
  keys = [tensor.key for tensor in plans]
  assert len(keys) == len(set(keys))
  assert set(keys) == _spec_keys(vision_layers=2, text_layers=6, frequency=3)
  # Slice 1 of sub-layer 2's stack is layer 3 * 1 + 2.
  (tensor,) = [t for t in plans if t.key == "qllama.model.layers.5.mlp.up_proj.weight"]
  assert tensor.flax == "qllama/layers/layer_2/mlp/up_proj/kernel"
  assert all(index[0] == 1 for _, index in tensor.blocks)


def test_config_json_is_what_the_official_code_reads():
  data = internvl_layouts.config_json(internvl_preset("14b-224"))
  assert data["architectures"] == ["InternVLModel"] and data["model_type"] == "internvl"
  assert data["tie_word_embeddings"] is False  # else the official loader ties lm_head (spec 12)
  assert (data["num_query_token"], data["cross_attention_frequency"]) == (96, 2)
  assert (data["clip_embed_dim"], data["attn_pool_num_heads"], data["hidden_size"]) == (768, 16, 4096)
  assert data["vision_config"]["hidden_size"] == 3200 and data["vision_config"]["qk_normalization"]
  assert data["qllama_config"]["vocab_size"] == 49954
  assert data["qllama_config"]["cross_attention_frequency"] == 2
  for config in (internvl_preset("14b-224"), TINY):
    written = internvl_layouts.config_json(config, allow_unofficial_sizes=True)
    assert internvl_layouts.config_from_json(written) == config
  fine_tuned = data | {"force_image_size": 364}  # the *-FT-364px checkpoints
  assert internvl_layouts.config_from_json(fine_tuned).vision.image_size == 364


def test_refuses_sizes_the_official_code_hard_codes():
  with pytest.raises(ValueError, match=r"hard-codes .*vision width 48 \(official: 3200\), "
                                       r"num_queries 4 \(official: 96\).*allow_unofficial_sizes"):
    internvl_layouts.config_json(TINY)
  with pytest.raises(ValueError, match=r"num_queries 32 \(official: 96\)"):
    internvl_layouts.config_json(internvl_preset("14b-224", num_queries=32))
  with pytest.raises(ValueError, match="LoRA-wrapped checkpoints are not supported"):
    internvl_layouts.config_from_json(internvl_layouts.config_json(
        internvl_preset("14b-224")) | {"use_qllama_lora": 16})


def test_mismatched_checkpoints_are_named(exported):
  _, directory = exported
  config, _, source = _import(directory)
  layout = internvl_layouts.official_layout()
  plans = keymap.plan(layout, abstract_params(config))
  keys = set(source.keys())
  # Rotary buffers that some transformers versions save are ignored.
  keymap.check_source(layout, plans, keys | {"qllama.model.layers.0.self_attn.rotary_emb.inv_freq"},
                      source.shape, source.dtype, allow_missing=False)
  with pytest.raises(keymap.ConversionError, match="missing keys: qllama.model.layers.2.cross_attn"):
    keymap.check_source(layout, plans, keys - {"qllama.model.layers.2.cross_attn.norm2.weight"},
                        source.shape, source.dtype, allow_missing=False)
  with pytest.raises(keymap.ConversionError, match="unexpected keys .*layers.1.cross_attn.q_proj"):
    keymap.check_source(layout, plans, keys | {"qllama.model.layers.1.cross_attn.q_proj.weight"},
                        source.shape, source.dtype, allow_missing=False)
