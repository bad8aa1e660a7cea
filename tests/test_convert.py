"""Conversion both ways: exact round trips, the official key names, and clear errors on bad input."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from internvl_jax.convert import keymap
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.convert.safetensors_io import SafetensorsFile
from internvl_jax.pretrained import load_pretrained
from scripts import REPO
from vit_fixtures import LAYERNORM_QKV_BIAS, RMS_QKNORM, random_params, random_pixels


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def state_dict(directory) -> dict:
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  out = {}
  for name in files:
    reader = SafetensorsFile(os.path.join(directory, name))
    out.update({key: reader.read(key) for key in reader.keys()})
  return out


@pytest.fixture(scope="module")
def params():
  return random_params(RMS_QKNORM)


@pytest.mark.parametrize("layout, prefix", [("official", ""), ("official", "vision_model."),
                                            ("transformers", ""), ("transformers", "model.vision_tower.")])
@pytest.mark.parametrize("config", [RMS_QKNORM, LAYERNORM_QKV_BIAS], ids=["rms", "layernorm"])
def test_round_trip_is_bit_exact(tmp_path, layout, prefix, config):
  params = random_params(config)
  export_pytorch(config, params, str(tmp_path), layout=layout, prefix=prefix)
  loaded_config, loaded = import_pytorch(str(tmp_path))
  assert loaded_config == config
  assert_trees_equal(params, loaded)


def test_official_keys_and_shapes_are_the_released_ones(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  tensors = state_dict(tmp_path)
  d, mlp, layers = 64, 256, RMS_QKNORM.num_layers
  expected = {"embeddings.class_embedding": (1, 1, d), "embeddings.patch_embedding.weight": (d, 3, 8, 8),
              "embeddings.patch_embedding.bias": (d,), "embeddings.position_embedding": (1, 17, d)}
  for i in range(layers):
    p = f"encoder.layers.{i}."
    expected.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.q_norm.weight": (d,),
                     p + "attn.k_norm.weight": (d,), p + "attn.proj.weight": (d, d),
                     p + "attn.proj.bias": (d,), p + "mlp.fc1.weight": (mlp, d), p + "mlp.fc1.bias": (mlp,),
                     p + "mlp.fc2.weight": (d, mlp), p + "mlp.fc2.bias": (d,), p + "norm1.weight": (d,),
                     p + "norm2.weight": (d,), p + "ls1": (d,), p + "ls2": (d,)})
  assert {k: v.shape for k, v in tensors.items()} == expected
  # The fused qkv rows are q, k, v in order, each head-major: row c is (c // d, c % d).
  qkv = params["blocks"]["attn"]["qkv"]["kernel"][0]  # (d, 3, heads, head_dim)
  np.testing.assert_array_equal(tensors["encoder.layers.0.attn.qkv.weight"][d + 5], qkv[:, 1].reshape(d, d)[:, 5])
  config = json.load(open(tmp_path / "config.json"))
  assert config["architectures"] == ["InternVisionModel"] and config["qk_normalization"] is True


def test_layouts_agree_with_each_other(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path / "hf"), layout="transformers")
  export_pytorch(RMS_QKNORM, params, str(tmp_path / "official"), layout="official")
  hf, official = state_dict(tmp_path / "hf"), state_dict(tmp_path / "official")
  q, k, v = (hf[f"encoder.layer.1.attention.{n}_proj.weight"] for n in "qkv")
  np.testing.assert_array_equal(official["encoder.layers.1.attn.qkv.weight"], np.concatenate([q, k, v]))
  np.testing.assert_array_equal(official["encoder.layers.1.ls2"], hf["encoder.layer.1.lambda_2"])


def test_bfloat16_export_and_sharded_files(tmp_path, params):
  files = export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official", dtype="bfloat16",
                         max_shard_bytes=20_000)
  assert len(files) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert state_dict(tmp_path)["encoder.layers.0.ls1"].dtype == ml_dtypes.bfloat16
  _, loaded = import_pytorch(str(tmp_path))
  rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  assert_trees_equal(rounded, loaded)


def test_reads_pickled_state_dicts_with_weights_only(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  tensors = {k: torch.from_numpy(v) for k, v in state_dict(tmp_path).items()}
  os.remove(tmp_path / "model.safetensors")
  torch.save({"module": tensors}, tmp_path / "intern_vit.pth")  # timm-style wrapping
  assert_trees_equal(params, import_pytorch(str(tmp_path))[1])


def test_refuses_pickles_that_are_not_plain_weights(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  os.remove(tmp_path / "model.safetensors")
  torch.save({"weights": keymap.Rule("a", "b")}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="weights_only=True"):
    import_pytorch(str(tmp_path))


def _edit_checkpoint(directory, edit):
  tensors = state_dict(directory)
  edit(tensors)
  os.remove(os.path.join(directory, "model.safetensors"))
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
             os.path.join(directory, "pytorch_model.bin"))


def test_missing_keys_are_named_and_can_be_allowed(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  _edit_checkpoint(tmp_path, lambda t: t.pop("encoder.layers.1.ls2"))
  with pytest.raises(keymap.ConversionError, match="missing keys: encoder.layers.1.ls2"):
    import_pytorch(str(tmp_path))
  _, loaded = import_pytorch(str(tmp_path), allow_missing=True)
  np.testing.assert_array_equal(loaded["blocks"]["ls2"][0], params["blocks"]["ls2"][0])
  np.testing.assert_array_equal(loaded["blocks"]["ls2"][1], np.full(64, RMS_QKNORM.layerscale_init, np.float32))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"encoder.layers.0.attn.qkv.bias": np.zeros(192, np.float32)}),
     "unexpected keys in the checkpoint: encoder.layers.0.attn.qkv.bias"),
    (lambda t: t.update({"encoder.layers.1.mlp.fc1.weight": np.zeros((256, 32), np.float32)}),
     r"encoder.layers.1.mlp.fc1.weight: shape \(256, 32\) does not match the model's \(256, 64\)"),
    (lambda t: t.update({"encoder.layers.0.ls1": np.zeros(64, np.int64)}),
     "encoder.layers.0.ls1: dtype int64 is not a floating-point dtype"),
])
def test_bad_tensors_are_named(tmp_path, params, edit, message):
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  _edit_checkpoint(tmp_path, edit)
  with pytest.raises(keymap.ConversionError, match=message):
    import_pytorch(str(tmp_path))


def test_files_that_are_not_checkpoints_are_refused(tmp_path, params):
  with pytest.raises(ValueError, match="neither a PyTorch checkpoint directory"):
    load_pretrained(str(tmp_path))
  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  (tmp_path / "model.safetensors").write_bytes(b"this is not a checkpoint at all")
  with pytest.raises(ValueError, match="is not a safetensors file"):
    import_pytorch(str(tmp_path))
  json.dump({"architectures": ["BertModel"]}, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="BertModel.*supported: .*'InternVisionModel'"):
    import_pytorch(str(tmp_path))


def test_load_pretrained_and_orbax_round_trip(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path / "torch"), layout="transformers")
  model = load_pretrained(str(tmp_path / "torch"))
  model.save(str(tmp_path / "orbax"))
  restored = load_pretrained(str(tmp_path / "orbax"))
  assert restored.config == RMS_QKNORM
  assert_trees_equal(jax.tree.map(np.asarray, model.params), jax.tree.map(np.asarray, restored.params))
  pixels = random_pixels((1, 32, 32, 3))
  assert restored.vision_features(pixels).shape == (1, 17, 64)
  assert restored.vision_features(pixels, layer=-2).shape == (1, 17, 64)


def _tool(name, *args):
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                        capture_output=True, text=True, cwd=REPO)


def test_command_lines_convert_both_ways_and_fail_clearly(tmp_path, params):
  export_pytorch(RMS_QKNORM, params, str(tmp_path / "official"), layout="official")
  result = _tool("convert_from_pytorch.py", "--src", str(tmp_path / "official"), "--out", str(tmp_path / "orbax"))
  assert result.returncode == 0, result.stderr
  assert "Converted" in result.stdout
  result = _tool("convert_to_pytorch.py", "--checkpoint", str(tmp_path / "orbax"), "--out",
                 str(tmp_path / "hf"), "--format", "transformers")
  assert result.returncode == 0, result.stderr
  assert_trees_equal(params, import_pytorch(str(tmp_path / "hf"))[1])

  result = _tool("convert_from_pytorch.py", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
  assert result.returncode == 2 and "error: " in result.stderr and "has no config.json" in result.stderr
  assert "Traceback" not in result.stderr


def test_readme_api(tmp_path, params):
  import internvl_jax

  export_pytorch(RMS_QKNORM, params, str(tmp_path), layout="official")
  model = internvl_jax.load_pretrained(str(tmp_path))
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  pixels = internvl_jax.normalize_images(images)
  np.testing.assert_allclose(pixels[..., 1].mean(), (images[..., 1].mean() / 255 - 0.456) / 0.224, rtol=1e-4)
  assert model.vision_features(pixels, layer=-2).shape == (2, 17, 64)
