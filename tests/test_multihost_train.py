"""Multi-host training: two processes x 4 CPU devices train exactly like one process x 8."""

import json
import os
import subprocess
import sys

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/tiny.py:runlocal", "--config.mesh.data=2", "--config.mesh.expert=4",
        "--config.num_train_steps=6", "--config.log_every=2", "--config.eval_every=6",
        "--config.checkpoint_every=3"]


def _launch(workdir, devices, extra=()):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "moejax.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  port = processes.free_port()
  multi = tmp_path / "multi"
  procs = [_launch(multi, 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}"]) for i in range(2)]
  single = tmp_path / "single"
  processes.wait_all(procs)
  processes.wait_all([_launch(single, 8)])

  multi_records, single_records = _records(multi), _records(single)
  # Only process 0 writes: every (split, step) appears once.
  keys = [(r["split"], r["step"]) for r in multi_records]
  assert len(keys) == len(set(keys)) and ("eval", 6) in keys
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
  for a, b in zip(multi_records, single_records, strict=True):
    assert (a["split"], a["step"]) == (b["split"], b["step"])
    for name in ("loss", "ce", "moe/balance_loss", "nodrop/ce"):
      if name in b:
        assert abs(a[name] - b[name]) < 1e-5, (name, a, b)
