"""Starts N processes on localhost the way a cluster launcher does, for multi-process tests.

Each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, so `sharding.maybe_initialize_distributed()` joins them with JAX's own runtime;
on the CPU their collectives go through gloo (jax's default CPU collectives). Each process sees
`devices` CPU devices, and PYTHONPATH is inherited, so they import the same checkout.
"""

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import portpicker

PYTHON = sys.executable


@dataclasses.dataclass
class Result:
  returncode: int
  output: str  # stdout and stderr, interleaved


def environment(base: dict | None = None, devices: int = 2, **extra) -> dict:
  """`base` (the test's environment) with `devices` host CPU devices per process."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.update({k: str(v) for k, v in extra.items()})
  return env


class Cluster:
  """N copies of `argv` started together; process i has JAX_PROCESS_ID=i.

  Output goes to a temporary file per process (pipes could fill and block a process that the
  test is not reading yet). Use as a context manager: on exit every process still running is
  killed, so a failed test leaves nothing behind.
  """

  def __init__(self, argv: list[str], num_processes: int, env: dict):
    self.num_processes = num_processes
    port = portpicker.pick_unused_port()
    self._logs = [tempfile.TemporaryFile("w+") for _ in range(num_processes)]
    self.processes = []
    for i in range(num_processes):
      if num_processes > 1:
        cluster_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
      else:  # one process: a plain run, as on a workstation
        cluster_env = {k: v for k, v in env.items() if not k.startswith("JAX_COORDINATOR")}
      self.processes.append(subprocess.Popen(argv, env=cluster_env, stdout=self._logs[i],
                                             stderr=subprocess.STDOUT, text=True))

  def output(self, i: int) -> str:
    self._logs[i].seek(0)
    return self._logs[i].read()

  def poll(self) -> list[int | None]:
    return [p.poll() for p in self.processes]

  def signal(self, signum: int, which=None):
    for i in range(self.num_processes) if which is None else which:
      self.processes[i].send_signal(signum)

  def wait(self, timeout: float) -> list[Result]:
    """Waits for every process to exit; raises TimeoutError (with their output) after `timeout`
    seconds, having killed the ones still running."""
    deadline = time.monotonic() + timeout
    for i, process in enumerate(self.processes):
      try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        raise TimeoutError(f"process {i} of {self.num_processes} still ran after {timeout} s; "
                           f"its output:\n{self.output(i)[-3000:]}") from None
    return [Result(p.returncode, self.output(i)) for i, p in enumerate(self.processes)]

  def kill(self):
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.kill()
    for log in self._logs:
      log.close()


def run(argv: list[str], num_processes: int, env: dict, timeout: float) -> list[Result]:
  """Runs `argv` on `num_processes` processes to completion; their results in process order."""
  with Cluster(argv, num_processes, env) as cluster:
    return cluster.wait(timeout)


def check(results: list[Result]) -> list[Result]:
  """`results`, after asserting that every process exited with 0 (else showing its output)."""
  for i, result in enumerate(results):
    assert result.returncode == 0, f"process {i} exited with {result.returncode}:\n" + (
        result.output[-4000:])
  return results
