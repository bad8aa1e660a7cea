"""Shared behaviour of the conversion command lines: clear messages and non-zero exits on bad input."""

import contextlib
import sys


@contextlib.contextmanager
def cli_errors():
  """Turns the library's input errors into one line on stderr and exit status 2."""
  try:
    yield
  except (ValueError, FileNotFoundError, NotADirectoryError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
