"""Test setup, before jax is imported: 8 host CPU devices for the sharding tests, and XLA's CPU
backend without LLVM optimization. The suite's time is mostly compiling tiny models, which this
cuts by about 40% (BUILD.md); the HLO, and so what the tests check, is the same."""

import os

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
