"""User errors on the command line: one `error: ...` line, exit code 2, no traceback.

A user error is a bad flag, config field, value or file, raised (as ValueError,
FileNotFoundError, NotADirectoryError) with a message that names the flag or field, the value and
what is allowed, before anything is built. Set MOEJAX_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

TRACEBACK_ENV = "MOEJAX_TRACEBACK"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def user_error(message: str) -> None:
  """Prints `error: message` to stderr and exits with code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def tracebacks_wanted() -> bool:
  return bool(os.environ.get(TRACEBACK_ENV))


def run(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)`, with a user error reported as one line (see the module docstring)."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    if tracebacks_wanted():
      raise
    user_error(str(e))
