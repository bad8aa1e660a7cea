"""Test setup, before jax is imported: 8 host CPU devices for the sharding tests, and XLA's CPU
backend without LLVM optimization. The suite's time is mostly compiling tiny models, which this
cuts by about 40% (BUILD.md); the HLO, and so what the tests check, is the same."""

import os
import subprocess
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(items):
  """Tests marked `long_running` (many processes, each compiling its own step) go first, so that
  the parallel workers fill in around them instead of finishing while one of them still runs."""
  items.sort(key=lambda item: item.get_closest_marker("long_running") is None)


def pytest_configure(config):
  config.addinivalue_line("markers", "long_running: start it before the others (minutes of CPU)")
  config.addinivalue_line("markers", "own_process: run it in a fresh Python process (see below)")


_IN_OWN_PROCESS = "INTERNVL_JAX_TEST_IN_OWN_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """Runs a test marked `own_process` in a pytest of its own. Compiling for a TPU topology loads
  libtpu, after which `jax.profiler.start_trace` crashes the process that loaded it (a
  segmentation fault in jax 0.10.2 with libtpu 0.0.52), so libtpu stays out of the workers;
  compiling takes no TPU, so several such processes may load libtpu at once."""
  if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(_IN_OWN_PROCESS):
    return None
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", **{_IN_OWN_PROCESS: "1"})
  run = subprocess.run(
      [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-n", "0", "-p", "no:cacheprovider"],
      cwd=pyfuncitem.config.rootpath, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, timeout=900, check=False)
  if run.returncode != 0:
    pytest.fail(f"{pyfuncitem.nodeid} in its own process exited with {run.returncode}:\n"
                f"{run.stdout[-6000:]}", pytrace=False)
  return True


@pytest.fixture(autouse=True)
def _libtpu_stays_out_of_this_process(request):
  """Fails a test that loaded libtpu without the `own_process` mark (before it can crash another
  test of this worker)."""
  yield
  if not os.environ.get(_IN_OWN_PROCESS) and os.path.exists("/proc/self/maps"):
    with open("/proc/self/maps") as maps:
      if "libtpu" in maps.read():
        pytest.fail(f"{request.node.nodeid} loaded libtpu in a pytest worker: mark it own_process")
