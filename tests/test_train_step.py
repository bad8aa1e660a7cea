"""The train step: accumulation equals the unaccumulated step, non-finite steps change nothing,
and config errors fail before compiling with a message that says what to change."""

import dataclasses

import jax
import numpy as np
import pytest

import train_fixtures
from internvl_jax import sharding
from internvl_jax.train import config as config_lib
from internvl_jax.train.loop import Trainer, trainer_for
from train_fixtures import one_step, tiny_config

MESH = sharding.MeshConfig(data=2, fsdp=2, tensor=2)  # params sharded, 4-way data parallel


@pytest.fixture(scope="module")
def unaccumulated():
  return trainer_for(tiny_config())  # 8-way data parallel; shared with test_train_loop


def test_accumulated_step_equals_the_unaccumulated_step(unaccumulated):
  batch = train_fixtures.make_batch(0)
  batch["valid"][3] = False  # a padding row: left out of the loss in both
  state, metrics = one_step(unaccumulated, batch)
  accumulated = Trainer(tiny_config(mesh=MESH, accum_steps=4))
  acc_state, acc_metrics = one_step(accumulated, batch)
  # The whole-batch loss (not a mean of micro-batch losses) and its gradient; only the order of
  # float sums differs.
  for name in ("loss", "grad_norm", "i2t_accuracy", "t2i_accuracy"):
    np.testing.assert_allclose(acc_metrics[name], metrics[name], rtol=2e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               acc_state.params, state.params)


def test_a_non_finite_step_leaves_the_state_unchanged_and_is_counted(unaccumulated):
  trainer = unaccumulated
  state = trainer.factory.init(seed=0)
  before = jax.tree.map(np.asarray, state)
  with trainer.context():
    state, metrics = trainer.step(state, trainer.global_batch(train_fixtures.make_batch(0, nan=True)))
  assert not np.isfinite(metrics["loss"]) and int(metrics["skipped_steps"]) == 1
  assert int(state.step) == 1 and int(state.skipped) == 1 and int(state.bad_streak) == 1
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state),
               (before.params, before.opt_state))
  with trainer.context():
    state, metrics = trainer.step(state, trainer.global_batch(train_fixtures.make_batch(1)))
  assert np.isfinite(metrics["loss"]) and int(state.bad_streak) == 0 and int(state.skipped) == 1
  assert float(metrics["lr/vision"]) == 0.0  # the schedule did not advance on the skipped step


@pytest.mark.parametrize("changes, message", [
    (dict(global_batch_size=12), r"global_batch_size 12 is not divisible by the data-parallel "
                                 r"size 8 .* use a multiple of 8"),
    (dict(accum_steps=4), r"data-parallel size 8 .* x accum_steps 4 = 32; use a multiple of 32"),
    (dict(mesh=sharding.MeshConfig(data=16)), r"needs 16 devices, but there are 8"),
    (dict(mesh=sharding.MeshConfig(data=2, fsdp=2, tensor=4)), r"needs 16 devices"),
])
def test_batch_and_mesh_errors_fail_before_compiling(changes, message):
  with pytest.raises(ValueError, match=message):
    Trainer(tiny_config(**changes))


@pytest.mark.parametrize("field, pattern", [
    ("frozen", r"^vision_model/no_such_layer/"),
    ("trainable", r"^txt_model/"),
])
def test_a_mask_regex_that_matches_nothing_is_named(field, pattern):
  optimizer = dataclasses.replace(train_fixtures.OPTIMIZER, **{field: (pattern,)})
  with pytest.raises(ValueError, match=rf"OptimizerConfig.{field}: the regex .* matches no param"):
    Trainer(tiny_config(optimizer=optimizer))


def test_freezing_everything_is_an_error():
  optimizer = dataclasses.replace(train_fixtures.OPTIMIZER, frozen=("",))
  with pytest.raises(ValueError, match="leave no param to train"):
    Trainer(tiny_config(optimizer=optimizer))


def test_overrides_replace_nested_fields_and_name_unknown_keys():
  config = config_lib.override(tiny_config(), {"optimizer.learning_rate": 0.5, "steps": 3})
  assert config.optimizer.learning_rate == 0.5 and config.num_steps == 3
  with pytest.raises(ValueError, match=r"Unknown config key 'optimizer.learnin_rate'.*"
                                       r"OptimizerConfig has no field 'learnin_rate'"):
    config_lib.override(config, {"optimizer.learnin_rate": 0.5})


def test_unknown_presets_list_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown preset 'big'; this experiment has \['demo'\]"):
    config_lib.preset({"demo": tiny_config}, "big")


def test_invalid_loop_settings_are_named():
  with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
    tiny_config(checkpoint_every=0)
