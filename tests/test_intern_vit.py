"""InternViT: sizes, resizing, masking, stochastic depth, remat, unrolled layers, dtypes, logical
axes, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from internvl_jax.config import vision_preset
from internvl_jax.models import interpolate
from internvl_jax.models.intern_vit import (InternViT, abstract_params, drop_path_rates,
                                            random_token_subset, select_layer)
from vit_fixtures import RMS_QKNORM, random_params, random_pixels


@pytest.mark.parametrize("preset, expected", [
    ("6b-224", 5_902_793_600),
    ("6b-448-v1.0", 5_905_251_200),
    ("6b-448-v1.5", 5_536_496_000),
    ("300m-448", 304_012_288),
])
def test_parameter_counts_match_the_released_models(preset, expected):
  shapes = abstract_params(vision_preset(preset))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


@pytest.mark.parametrize("in_size, out_size", [(4, 7), (7, 4), (16, 24), (5, 5), (3, 1)])
def test_bicubic_resize_matches_torch_interpolate(in_size, out_size):
  grid = np.random.default_rng(0).normal(size=(in_size, in_size, 6)).astype(np.float32)
  ours = interpolate.resize_bicubic(jnp.asarray(grid), (out_size, out_size + 1))
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_size, out_size + 1),
      mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_position_embedding_resize_keeps_the_cls_row():
  pos = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
  resized = interpolate.resize_pos_embed(jnp.asarray(pos), (6, 5))
  assert resized.shape == (1, 31, 8)
  np.testing.assert_array_equal(resized[:, 0], pos[:, 0])


@pytest.fixture(scope="module")
def tiny():
  return InternViT(RMS_QKNORM), random_params(RMS_QKNORM)


def test_output_shapes_and_hidden_states(tiny):
  model, params = tiny
  output = model.apply({"params": params}, random_pixels((2, 48, 40, 3)), return_hidden_states=True)
  num_tokens = 1 + (48 // 8) * (40 // 8)
  assert output.last_hidden_state.shape == (2, num_tokens, 64)
  assert output.hidden_states.shape == (RMS_QKNORM.num_layers + 1, 2, num_tokens, 64)
  np.testing.assert_array_equal(select_layer(output, -1), output.hidden_states[-1])
  np.testing.assert_array_equal(select_layer(output, -2), output.hidden_states[1])
  with pytest.raises(ValueError, match="out of range"):
    select_layer(output, -4)


def test_token_masking_keeps_cls_and_a_subset_of_patches():
  tokens = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
  kept = random_token_subset(tokens, 0.5, jax.random.key(0))
  assert kept.shape == (2, 1 + 8, 3)
  np.testing.assert_array_equal(kept[:, 0], tokens[:, 0])
  for row in range(2):
    kept_rows = {tuple(t) for t in np.asarray(kept[row, 1:])}
    assert len(kept_rows) == 8 and kept_rows <= {tuple(t) for t in np.asarray(tokens[row, 1:])}


def test_token_masking_applies_in_training_only(tiny):
  model, params = tiny
  pixels = random_pixels((2, 32, 32, 3))
  rngs = {"masking": jax.random.key(1), "dropout": jax.random.key(2)}
  train = model.apply({"params": params}, pixels, train=True, keep_fraction=0.5, rngs=rngs)
  evaluation = model.apply({"params": params}, pixels, train=False, keep_fraction=0.5)
  assert train.last_hidden_state.shape == (2, 1 + 8, 64)
  assert evaluation.last_hidden_state.shape == (2, 17, 64)


def test_drop_path_schedules_and_training_randomness():
  assert np.allclose(drop_path_rates(RMS_QKNORM.replace(drop_path_rate=0.2, num_layers=3)), [0, 0.1, 0.2])
  uniform = RMS_QKNORM.replace(drop_path_rate=0.2, drop_path_schedule="uniform", num_layers=3)
  assert np.allclose(drop_path_rates(uniform), [0.2] * 3)
  config = RMS_QKNORM.replace(drop_path_rate=0.5, drop_path_schedule="uniform")
  model, params = InternViT(config), random_params(config)
  pixels = random_pixels((8, 32, 32, 3))
  run = lambda seed, train: model.apply({"params": params}, pixels, train=train,
                                        rngs={"dropout": jax.random.key(seed)}).last_hidden_state
  assert not np.allclose(run(0, True), run(1, True))
  np.testing.assert_array_equal(run(0, False), run(1, False))


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "offload_dot_except_mlp_in"])
def test_remat_policies_give_the_same_gradients(tiny, policy):
  _, params = tiny
  pixels = random_pixels((2, 32, 32, 3))

  def grads(config):
    loss = lambda p: jnp.sum(InternViT(config).apply({"params": p}, pixels).last_hidden_state ** 2)
    return jax.jit(jax.grad(loss))(params)

  reference, rematerialized = grads(RMS_QKNORM), grads(RMS_QKNORM.replace(remat_policy=policy))
  # Float32 rounding only: the two programs sum in other orders (up to 5e-6 apart on this CPU
  # without LLVM optimization, tests/conftest.py); a wrong remat differs by far more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), reference,
               rematerialized)


@pytest.mark.parametrize("policy", ["none", "save_qkv_proj"])
def test_unrolled_layers_equal_the_scan_on_the_same_params(tiny, policy):
  _, params = tiny
  pixels = random_pixels((2, 32, 32, 3))

  def run(config):
    def loss(p):
      out = InternViT(config).apply({"params": p}, pixels, return_hidden_states=True)
      return jnp.sum(out.last_hidden_state ** 2) + jnp.sum(out.hidden_states ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  scanned = RMS_QKNORM.replace(remat_policy=policy)
  (loss, out), grads = run(scanned)
  (unrolled_loss, unrolled_out), unrolled_grads = run(scanned.replace(scan_layers=False))
  np.testing.assert_allclose(unrolled_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(unrolled_out.hidden_states, out.hidden_states, rtol=1e-5, atol=1e-5)
  # Float32 rounding only (the two programs sum in other orders), within 1e-5 of each gradient's
  # scale; a wrong layer or param slice differs by far more.
  for path, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(grads)),
                        jax.tree.leaves(unrolled_grads)):
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a)), jax.tree_util.keystr(path)


def test_unrolled_layers_draw_drop_path_per_layer():
  config = RMS_QKNORM.replace(drop_path_rate=0.5, drop_path_schedule="uniform",
                              scan_layers=False)
  model, params = InternViT(config), random_params(config)
  pixels = random_pixels((8, 32, 32, 3))
  run = lambda seed: model.apply({"params": params}, pixels, train=True,
                                 rngs={"dropout": jax.random.key(seed)}).last_hidden_state
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  evaluation = model.apply({"params": params}, pixels).last_hidden_state
  assert not np.allclose(run(0), evaluation)


def test_bfloat16_compute_keeps_float32_params(tiny):
  _, params = tiny
  config = RMS_QKNORM.replace(dtype="bfloat16")
  pixels = random_pixels((2, 32, 32, 3))
  variables = InternViT(config).init(jax.random.key(0), pixels)
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype(jnp.float32)}
  low = InternViT(config).apply({"params": params}, pixels).last_hidden_state
  high = InternViT(RMS_QKNORM).apply({"params": params}, pixels).last_hidden_state
  assert low.dtype == jnp.bfloat16
  assert np.abs(np.asarray(low, np.float32) - high).mean() < 0.05 * np.abs(high).mean()


def test_every_param_names_its_logical_axes():
  variables = jax.eval_shape(InternViT(RMS_QKNORM).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["blocks"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", None, "vit_heads", "head_dim")
  assert specs["blocks"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")


@pytest.mark.parametrize("shape, message", [
    ((2, 32, 32, 4), "4 channels, the model expects 3"),
    ((2, 3, 32, 32), "NHWC, not NCHW"),
    ((2, 30, 32, 3), "not a multiple of the patch size 8"),
    ((32, 32, 3), "must be \\(batch, height, width, channels\\)"),
])
def test_bad_pixels_give_clear_errors(tiny, shape, message):
  model, params = tiny
  with pytest.raises(ValueError, match=message):
    model.apply({"params": params}, np.zeros(shape, np.float32))


def test_bad_configs_give_clear_errors():
  with pytest.raises(ValueError, match="Unknown vision preset"):
    vision_preset("7b")
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    vision_preset("tiny", num_heads=5)
  with pytest.raises(ValueError, match="remat_policy"):
    vision_preset("tiny", remat_policy="sometimes")
