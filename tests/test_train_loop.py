"""The training loop: metrics, checkpoints, resume (in process, after SIGKILL and SIGTERM, onto
another mesh), a crash during a save, and stopping on non-finite steps."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_fixtures
from internvl_jax import sharding
from internvl_jax.train import loop
from internvl_jax.train.checkpoint import Checkpoints
from internvl_jax.train.state import StateFactory
from train_fixtures import InMemoryPairs, losses_by_step, read_metrics, tiny_config

STEPS = 12
RUN_SCRIPT = os.path.join(os.path.dirname(__file__), "train_run.py")


def final_checkpoint(workdir, config):
  checkpoints = Checkpoints(os.path.join(workdir, loop.CHECKPOINT_DIR))
  step = checkpoints.latest_step()
  state, data_state = checkpoints.restore(step, loop.trainer_for(config).factory.abstract())
  checkpoints.close()
  return step, jax.tree.map(np.asarray, state), data_state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run, checkpoints every 3 steps, profiled for steps [1, 2)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(steps=STEPS, profile_steps=(1, 2))
  state = loop.train(config, InMemoryPairs(), workdir)
  return dict(workdir=workdir, params=jax.tree.map(np.asarray, state.params),
              losses=losses_by_step(read_metrics(workdir)))


def run_script(workdir, env, *args):
  return subprocess.Popen([sys.executable, RUN_SCRIPT, workdir, "--steps", str(STEPS), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(workdir, process, step, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()[0][-3000:]
    if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(workdir)):
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} was not logged in {timeout} s")


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
  """The test's environment (8 CPU devices) plus a compilation cache that the runs share."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def test_metrics_are_logged_every_step_with_throughput_and_tensorboard(reference):
  records = read_metrics(reference["workdir"])
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for record in records[1:]:  # the first step is compilation, not timed
    for key in ("loss", "i2t_accuracy", "logit_scale", "grad_norm", "lr/vision", "lr/text",
                "skipped_steps", "samples_per_second", "tokens_per_second", "tflops_per_device",
                "mfu"):
      assert np.isfinite(record[key]), key
  assert records[1]["lr/text"] == pytest.approx(0.1 * records[1]["lr/vision"])
  assert records[-1]["skipped_steps"] == 0 and records[-1]["loss"] < records[0]["loss"]
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(reference["workdir"], "tensorboard")))
  assert any(files for _, _, files in os.walk(os.path.join(reference["workdir"], "profile")))


def test_checkpoints_keep_the_last_k_with_the_data_position(reference):
  checkpoints = Checkpoints(os.path.join(reference["workdir"], loop.CHECKPOINT_DIR))
  assert checkpoints.all_steps() == [9, 12]
  checkpoints.close()
  step, state, data_state = final_checkpoint(reference["workdir"], tiny_config())
  assert step == STEPS and int(state.step) == STEPS and data_state == {"next_index": STEPS}
  jax.tree.map(np.testing.assert_array_equal, state.params, reference["params"])


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(reference, subprocess_env,
                                                                 tmp_path):
  workdir = str(tmp_path)
  process = run_script(workdir, subprocess_env, "--batch-delay", "0.3")
  wait_for_step(workdir, process, 7)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(r["step"] for r in read_metrics(workdir))
  assert killed_at < STEPS
  resumed = run_script(workdir, subprocess_env)
  output = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, output[-3000:]

  losses = losses_by_step(read_metrics(workdir))  # re-run steps agree with their first run
  assert losses == reference["losses"]  # bit-exact: every step saw the same batch
  step, state, data_state = final_checkpoint(workdir, tiny_config())
  assert step == STEPS and data_state == {"next_index": STEPS}  # no batch skipped or repeated
  jax.tree.map(np.testing.assert_array_equal, state.params, reference["params"])


def test_sigterm_saves_the_current_step_and_the_run_resumes(reference, subprocess_env, tmp_path):
  workdir = str(tmp_path)
  process = run_script(workdir, subprocess_env, "--batch-delay", "0.3")
  wait_for_step(workdir, process, 4)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0 and "Preempted: saved step" in output, output[-3000:]
  stopped_at = max(r["step"] for r in read_metrics(workdir))
  step, _, data_state = final_checkpoint(workdir, tiny_config())
  assert step == stopped_at < STEPS and data_state == {"next_index": stopped_at}

  state = loop.train(tiny_config(steps=STEPS), InMemoryPairs(), workdir)  # resumes in process
  assert losses_by_step(read_metrics(workdir)) == reference["losses"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params),
               reference["params"])


@pytest.mark.parametrize("mesh", [sharding.MeshConfig(data=2, fsdp=2, tensor=2),
                                  sharding.MeshConfig(data=1, fsdp=8)], ids=["2x2x2", "1x8x1"])
def test_a_checkpoint_restores_onto_another_mesh(reference, mesh):
  checkpoints = Checkpoints(os.path.join(reference["workdir"], loop.CHECKPOINT_DIR))
  factory = StateFactory(train_fixtures.tiny_config().stage, train_fixtures.OPTIMIZER,
                         sharding.make_mesh(mesh), mesh.logical_rules)
  state, _ = checkpoints.restore(STEPS, factory.abstract())
  checkpoints.close()
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params),
               reference["params"])
  assert state.params["vision_model"]["blocks"]["mlp"]["fc1"]["kernel"].sharding == (
      factory.param_shardings["vision_model"]["blocks"]["mlp"]["fc1"]["kernel"])


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(reference, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(reference["workdir"], workdir, dirs_exist_ok=True)
  directory = os.path.join(workdir, loop.CHECKPOINT_DIR)
  # What a process killed while writing step 15 leaves: orbax's temporary directory, half full.
  partial = os.path.join(directory, "15.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(directory, "12"), partial)
  shutil.rmtree(os.path.join(partial, "state"))
  checkpoints = Checkpoints(directory)
  assert checkpoints.latest_step() == STEPS
  checkpoints.close()
  step, state, _ = final_checkpoint(workdir, tiny_config())
  assert step == STEPS
  jax.tree.map(np.testing.assert_array_equal, state.params, reference["params"])


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  data = InMemoryPairs(nan_batches={3, 4, 5})  # steps 4, 5 and 6 see a NaN pixel
  with pytest.raises(loop.NonFiniteError, match=r"Step 6: the loss or gradients were not finite "
                                                r"for 3 consecutive steps"):
    loop.train(tiny_config(steps=STEPS, max_bad_steps=3), data, workdir)
  records = read_metrics(workdir)
  assert [r["skipped_steps"] for r in records[3:]] == [1, 2, 3]
  step, state, _ = final_checkpoint(workdir, tiny_config())
  assert step == 3 and int(state.skipped) == 0


def test_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
  workdir = str(tmp_path)
  loop.train(tiny_config(steps=6), InMemoryPairs(nan_batches={1}), workdir)
  records = read_metrics(workdir)
  assert records[1]["skipped_steps"] == 1 and not np.isfinite(records[1]["loss"])
  assert records[-1]["skipped_steps"] == 1 and np.isfinite(records[-1]["loss"])


class PairsWithIssueCounts(InMemoryPairs):
  """The data pipeline's iterator also reports the records it skipped, by reason."""

  def issue_counts(self):
    return {"image_undecodable": 2 * self.next_index, "caption_empty": 1}


def test_the_data_pipelines_skip_counts_are_logged(tmp_path):
  loop.train(tiny_config(steps=2), PairsWithIssueCounts(), str(tmp_path))
  records = read_metrics(str(tmp_path))
  # Logged after each step, when the iterator has read that step's batch and the next one.
  assert [r["data/image_undecodable"] for r in records] == [4, 4]
  assert all(r["data/caption_empty"] == 1 for r in records)
