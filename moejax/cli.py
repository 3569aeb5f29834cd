"""User errors on the command line: one `error: ...` line, exit code 2, no traceback.

A user error is a bad flag, config field, value or file, raised (as ValueError,
FileNotFoundError, NotADirectoryError) with a message that names the flag or field, the value and
what is allowed, before anything is built. Set MOEJAX_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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


# Libraries whose INFO lines drown the progress lines: orbax (~30 lines per save), TFDS ("Load
# dataset info" per pipeline), JAX's backend probe ("Unable to initialize backend 'tpu'" on CPU).
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")


class _DropLibraryInfo(logging.Filter):
  """Drops INFO records of chatty libraries; their warnings still pass, but for one known to be
  harmless: orbax's "Metadata file does not exist: .../state/_CHECKPOINT_METADATA" when the
  restore check reads the `state` item's array metadata (that file lives one level up, in the
  step directory, where orbax's manager writes it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" in record.pathname and "_CHECKPOINT_METADATA" in str(record.msg) + str(
        record.args) and "does not exist" in str(record.msg):
      return False
    return record.levelno > logging.INFO or not any(p in record.pathname for p in _CHATTY)


def quiet_library_logs() -> None:
  """Keeps the console to moejax's own progress lines (warnings still pass). Needs no absl:
  a peer benchmark runs `cli.run` in a Python without it."""
  targets = [logging.getLogger("absl"), logging.getLogger("jax._src.xla_bridge")]
  try:  # absl's handler (absl.app commands); plain-Python commands' records reach the root
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    targets.append(absl_logging.get_absl_handler())  # logger's handler instead.
  except ImportError:
    pass
  for target in targets:
    if not any(isinstance(f, _DropLibraryInfo) for f in target.filters):
      target.addFilter(_DropLibraryInfo())


def run(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)`, with a user error reported as one line (see the module docstring).
  A `--config=path[:arg]` on the command line that does not load is reported first (absl's
  config flags defer loading the file to its first use)."""
  quiet_library_logs()
  problem = config_load_error(sys.argv[1:])
  if problem is not None and not tracebacks_wanted():
    user_error(problem)
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    if tracebacks_wanted():
      raise
    user_error(str(e))


def require(modules: tuple[str, ...], extra: str, purpose: str) -> None:
  """A one-line error (exit 2) when an optional dependency is missing, naming the pip extra that
  installs it, e.g. `require(("matplotlib", "scipy"), "studies", "reproduce.py (its plots)")`."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    user_error(f"{purpose} needs {', '.join(missing)}, not installed; allowed: install the "
               f"'{extra}' extra (python3 -m pip install -e \".[{extra}]\", or "
               f"pip install \"moejax[{extra}]\").")


def check_workdir(workdir: str) -> None:
  """A `--workdir` must be a directory (new, or a run's to resume it)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file; allowed: a directory (new or a "
                             "run's, to resume it).")


# --------------------------------------------------------------------------------------------------
# `--config=path[:arg]` and `--config.a.b=v` flags (ml_collections config_flags + absl).
# --------------------------------------------------------------------------------------------------


def _config_spec(argv: list[str]) -> str | None:
  return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def _loaded_config(argv: list[str]):
  """(path, ConfigDict) of the `--config=path[:arg]` in argv, or None."""
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    return spec.partition(":")[0], config_lib.load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # The config itself fails to load: that error is reported, not this one.


def unknown_override(argv: list[str]) -> str | None:
  """For a `--config.a.b=v` naming a field the config lacks: a one-line "did you mean"."""
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  loaded = _loaded_config(argv)
  if loaded is None:
    return None
  for item in argv:
    if item.startswith("--config."):
      try:
        config_lib.lookup(loaded[1], item[len("--config."):].split("=", 1)[0])
      except KeyError as e:
        return f"{item}: {e.args[0]}"
  return None


def expected_type(argv: list[str], error: str) -> str:
  """`"; allowed: an int (configs/tiny.py sets 2)"` for the config field a flag error names."""
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  loaded, name = _loaded_config(argv), error.removeprefix("flag ").split("=", 1)[0]
  if loaded is None or not name.startswith("--config."):
    return ""
  try:
    node, leaf = config_lib.lookup(loaded[1], name[len("--config."):])
  except KeyError:
    return ""
  value = node[leaf]
  kind = type(value).__name__
  return f"; allowed: {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({loaded[0]} sets {value!r})"


def config_load_error(argv: list[str]) -> str | None:
  """Why `--config=path[:arg]` cannot be loaded (missing file, unknown arg, ...), or None."""
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  spec = _config_spec(argv)
  if spec is None:
    return None
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    return (f"--config={spec}: no such config file {path!r} (run from the repository root, or "
            "give a path to a configs/*.py file)")
  try:
    config_lib.load_config(spec)
  except ValueError as e:  # a config's own message (e.g. an unknown config arg)
    return f"--config={spec}: {e}"
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec}: {type(e).__name__}: {e}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error (exit 2) for a config file that does not load, a
  misspelled config field or a value of the wrong type."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if tracebacks_wanted():
      raise
    user_error(unknown_override(argv[1:]) or config_load_error(argv[1:]) or str(e))
  except flags.IllegalFlagValueError as e:  # `--config.batch_size=abc`: name the expected type.
    if tracebacks_wanted():
      raise
    user_error(config_load_error(argv[1:])
               or f"{str(e).removeprefix('flag ')}{expected_type(argv[1:], str(e))}")
  except Exception:  # pylint: disable=broad-except  # the config file raised while loading
    problem = config_load_error(argv[1:])
    if problem is None or tracebacks_wanted():
      raise
    user_error(problem)
  return []  # Unreachable: user_error exits.


class Progress:
  """`label: done/total (pct), ETA m:ss` on stderr, at most every `every_s` seconds and at the
  end: the progress line of the long commands (evaluate, routing analysis)."""

  def __init__(self, total: int, label: str, every_s: float = 5.0):
    self.total, self.label, self.every_s = max(int(total), 1), label, every_s
    self.start = self.last = time.time()

  def update(self, done: int) -> None:
    now = time.time()
    if done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    rate = (now - self.start) / max(done, 1)
    eta = rate * (self.total - done)
    print(f"{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%), ETA "
          f"{int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)
