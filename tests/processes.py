"""Helpers for tests that launch several local processes (multi-host on 127.0.0.1)."""

import socket
import subprocess


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now (for the jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """Waits for every process; kills all if one hangs; asserts each exited 0. Returns outputs."""
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, out[-4000:]
    outs.append(out)
  return outs
