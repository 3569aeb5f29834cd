"""Test set-up: 8 fake CPU devices, so multi-device tests run on any machine.

XLA reads the flag when JAX initialises its backends, which happens lazily on first use, so
setting it here (before any test imports and uses jax) is early enough.

Many tests compile the same tiny programs (one train step of the same config, in-process and in
the subprocesses of the multi-host and kill-campaign tests), so the suite shares JAX's persistent
compilation cache: one directory per user under the system temp dir, shared by the xdist workers
and inherited by subprocesses through the environment. It cuts `tests/test_train.py` from 11.7 to
6.9 CPU-minutes. Set `JAX_COMPILATION_CACHE_DIR` yourself to move it, or to an empty string to
switch it off. Cache keys include the JAX version, the program and the devices, so an old entry
is never reused for a different computation.
"""
import getpass
import os
import tempfile

import pytest

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TensorFlow (imported only by data tests) off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"moejax-tests-jax-cache-{getpass.getuser()}"))
# Cache every program, however small or fast to compile: the suite's are all small.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_after_each_module():
  """An xdist worker runs many test files in one process; without this it keeps every file's
  executables and their memory mappings reach `vm.max_map_count` late in the suite (then
  array_record's thread pool hangs and executable loads segfault; see
  `moejax.study.runner.release_compiled_programs`)."""
  yield
  from moejax.study.runner import release_compiled_programs  # pylint: disable=import-outside-toplevel
  release_compiled_programs()
