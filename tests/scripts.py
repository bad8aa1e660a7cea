"""The project's scripts (tools/*.py, experiments/*.py) loaded as modules: they are not a package."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str):
  """The script at `path` (relative to the repository root) as a module named after its file."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
