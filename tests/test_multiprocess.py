"""Multi-process runs, 2 processes x 2 CPU devices started as a cluster starts them
(tests/multiprocess.py): the stage 1 and stage 3 demos, metrics summed over processes, kill -9
and SIGTERM of every process then a restart, a restart on another process count, and one
process killed alone.

Most runs are the tiny training of `train_fixtures` (tests/train_run.py), whose global batches do
not depend on the process count, so every interrupted run must log the uninterrupted run's
losses. Each process compiles its own step: the runs use no persistent compilation cache, since
with one (written by process 0 of an earlier run) a 2-process run hung before its first step on
jax 0.10.2.
"""

import os
import shutil
import signal
import time

import numpy as np
import pytest

import multiprocess
import train_fixtures
from scripts import REPO
from train_fixtures import losses_by_step, read_metrics
from internvl_jax.sharding import HEARTBEAT_TIMEOUT_ENV
from internvl_jax import loading

pytestmark = pytest.mark.long_running

PROCESSES, DEVICES = 2, 2
STEPS = 8  # the tiny config checkpoints every 3 steps and keeps 2: steps 6 and 8 remain
TESTS = os.path.dirname(os.path.abspath(__file__))
TRAIN = [multiprocess.PYTHON, os.path.join(TESTS, "train_run.py")]
TIMEOUT = 600


@pytest.fixture(scope="module")
def env():
  return multiprocess.environment(devices=DEVICES)


def train(workdir, env, steps=STEPS, processes=PROCESSES):
  return multiprocess.check(multiprocess.run(
      [*TRAIN, workdir, "--steps", str(steps)], processes, env, TIMEOUT))


def wait_for(cluster, done, what, timeout=TIMEOUT):
  """Waits until `done()`; fails if any process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for i, code in enumerate(cluster.poll()):
      assert code is None, f"process {i} exited with {code}:\n{cluster.output(i)[-3000:]}"
    if done():
      return
    time.sleep(0.1)
  raise TimeoutError(f"{what} did not happen in {timeout} s")


def wait_for_step(workdir, cluster, step):
  """Waits until process 0 has logged `step`."""
  path = os.path.join(workdir, "metrics.jsonl")
  wait_for(cluster, lambda: os.path.exists(path) and any(
      r["step"] >= step for r in read_metrics(workdir)), f"step {step}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted 2-process run of STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train(workdir, env)
  return dict(workdir=workdir, records=read_metrics(workdir),
              losses=losses_by_step(read_metrics(workdir)))


def test_metrics_count_every_processs_tokens_and_skipped_records(reference):
  records = reference["records"]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # process 0 alone writes
  stage = train_fixtures.tiny_config().stage
  for record in records[1:]:  # log_every 1: each record's interval is its step's global batch
    batch = train_fixtures.make_batch(record["step"] - 1)
    assert record["tokens_per_second"] / record["samples_per_second"] == pytest.approx(
        stage.count_tokens(batch) / train_fixtures.BATCH)
  # Each process's data reports skipped records of its own (train_run.py): 1 and 2.
  assert all((r["data/caption_empty"], r["data/image_undecodable"]) == (1, 2) for r in records)


def test_sigkill_of_every_process_then_a_restart_gives_the_same_losses(reference, env,
                                                                       tmp_path):
  workdir = str(tmp_path)
  with multiprocess.Cluster([*TRAIN, workdir, "--steps", str(STEPS), "--batch-delay", "0.3"],
                            PROCESSES, env) as cluster:
    wait_for(cluster, lambda: 3 in loading.checkpoint_steps(workdir), "checkpoint 3")
    cluster.signal(signal.SIGKILL)
    cluster.wait(60)
  killed_at = max(r["step"] for r in read_metrics(workdir))
  assert killed_at < STEPS
  train(workdir, env)
  assert losses_by_step(read_metrics(workdir)) == reference["losses"]
  assert loading.checkpoint_steps(workdir)[-1] == STEPS


def test_sigterm_to_every_process_saves_one_step_and_the_run_resumes_exactly(reference, env,
                                                                             tmp_path):
  workdir = str(tmp_path)
  with multiprocess.Cluster([*TRAIN, workdir, "--steps", str(STEPS), "--batch-delay", "0.3"],
                            PROCESSES, env) as cluster:
    wait_for_step(workdir, cluster, 2)
    cluster.signal(signal.SIGTERM)
    results = multiprocess.check(cluster.wait(120))
  stopped_at = max(r["step"] for r in read_metrics(workdir))
  assert f"Preempted: saved step {stopped_at}" in results[0].output
  assert stopped_at < STEPS and loading.checkpoint_steps(workdir)[-1] == stopped_at
  train(workdir, env)
  assert losses_by_step(read_metrics(workdir)) == reference["losses"]


def test_a_run_continues_on_another_process_count(reference, env, tmp_path):
  """2 -> 1 from the reference's step-6 checkpoint to step 7, then 1 -> 2 to the end. The
  single process has all 4 devices, so the mesh (and the losses, up to the order of the
  cross-process sums) stay the same."""
  workdir = str(tmp_path)
  shutil.copytree(reference["workdir"], workdir, dirs_exist_ok=True)
  shutil.rmtree(os.path.join(workdir, loading.CHECKPOINT_DIR, str(STEPS)))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  one = multiprocess.environment(env, devices=PROCESSES * DEVICES)
  assert loading.checkpoint_steps(workdir) == [6]
  train(workdir, one, STEPS - 1, 1)
  assert loading.checkpoint_steps(workdir)[-1] == STEPS - 1
  train(workdir, env)
  losses = losses_by_step(read_metrics(workdir))
  assert list(losses) == [7, 8]
  np.testing.assert_allclose([losses[7], losses[8]],
                             [reference["losses"][7], reference["losses"][8]], rtol=1e-5)


def test_one_process_killed_alone_stops_the_others_with_a_message(env, tmp_path):
  workdir = str(tmp_path)
  heartbeat = 10
  with multiprocess.Cluster([*TRAIN, workdir, "--steps", str(STEPS), "--batch-delay", "0.3"],
                            PROCESSES, dict(env, **{HEARTBEAT_TIMEOUT_ENV: str(heartbeat)})
                            ) as cluster:
    wait_for_step(workdir, cluster, 2)
    cluster.signal(signal.SIGKILL, [1])
    killed = time.monotonic()
    survivor = cluster.wait(6 * heartbeat)[0]
  assert time.monotonic() - killed < 6 * heartbeat
  assert survivor.returncode != 0
  assert "stopped sending heartbeats" in survivor.output, survivor.output[-3000:]


def build_demo_data(experiment):
  """Builds the experiment's demo data and tokenizer here, unless built, so that the processes
  do not all build them at once."""
  path = os.path.join(REPO, "experiments", f"{experiment}.py")
  module = train_fixtures.load_experiment(experiment)
  module.data(module.get_config("demo")).close()
  return path


@pytest.mark.parametrize("experiment, settings", [
    ("stage1_contrastive", ("train.steps=3", "train.checkpoint_every=2")),
    ("stage3_sft", ("train.steps=2", "train.checkpoint_every=1", "init=()")),
])
def test_the_demo_experiments_run_on_two_processes(env, tmp_path, experiment, settings):
  workdir = str(tmp_path)
  results = multiprocess.check(multiprocess.run(
      [multiprocess.PYTHON, build_demo_data(experiment), "--workdir", workdir,
       "--set", "train.log_every=1", "--set", "eval.every=None",
       *(arg for setting in settings for arg in ("--set", setting))], PROCESSES, env, TIMEOUT))
  steps = int(settings[0].split("=")[1])
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert loading.checkpoint_steps(workdir)[-1] == steps
  assert f"done, step {steps}" in results[0].output  # the summary: process 0 alone prints it
  assert "done, step" not in results[1].output
