"""Benchmark: the real train step of a config on any mesh — tokens/s, step time, compile time,
memory and model FLOPs utilisation (MFU).

    python experiments/bench_train.py --config=configs/switch.py --steps=10
    python experiments/bench_train.py --config=configs/dense.py --revisions=054c109,. \
        --rounds=5 --steps=20        # side by side: two git revisions, interleaved rounds
    python experiments/bench_train.py --config=configs/switch.py --config.mesh.fsdp=2 \
        --config.mesh.data=-1 --config.model.dtype=bfloat16 --steps=20 --peak_tflops=989

It builds the model and optimizer exactly as `train_and_evaluate` does (`train.make_train_step`,
the state donated, shardings from `sharding.LOGICAL_AXIS_RULES`), feeds random tokens (no data
pipeline: what is timed is the step), and reports:

- compile time (lower + compile of the step, once);
- step time: the median over `--steps` steps after `--warmup`, each timed to its result;
- tokens/s = batch_size x seq_len / step time (global, all devices);
- memory: the compiled step's arguments (parameters + optimizer state + batch), temporaries
  and outputs per device (`compiled.memory_analysis()`), and the device's peak bytes in use
  where the runtime reports it (GPU, TPU);
- MFU = model FLOPs/token (`count_params(...).flops_per_token`, PaLM's 6N + attention formula:
  capacity padding, the router and dispatch are *not* counted, as MFU conventions require) x
  tokens/s / (peak FLOP/s per device x devices). The peak is looked up from the device kind
  (dense bfloat16: H100/H200 989, A100 312, TPU v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s) or
  given with `--peak_tflops`; on a CPU there is none and MFU is not printed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

# Dense bfloat16 peak TFLOP/s per chip, by a substring of `jax.Device.device_kind` (lower case);
# the first match wins, so the longer names come first.
PEAK_TFLOPS = (("gh200", 989.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
               ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v5 lite", 197.0),
               ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0), ("tpu v4", 275.0))


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)


def compiled_step(config):
  """`(step, state, batch, mesh, model_cfg, compile_s, graphdef)`: the train step of `config`
  compiled as `train_and_evaluate` compiles it (state donated), its state and graph, and a batch
  of random tokens."""
  from moejax import optim, sharding, train  # pylint: disable=import-outside-toplevel
  model_cfg = train.validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  graphdef, state = nnx.split(train.create_model_and_optimizer(model_cfg, tx, mesh, config.seed))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  B, L = config.batch_size, config.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model_cfg.vocab_size, (B, L + 1), dtype=np.int32)
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
                "segment_ids": np.ones((B, L), np.int32), "mask": np.ones((B, L), np.int32)}
  batch_sharding = sharding.batch_sharding(mesh, 2)
  batch = {k: jax.device_put(v, batch_sharding) for k, v in host_batch.items()}
  with jax.set_mesh(mesh):
    step_fn = jax.jit(train.make_train_step(graphdef, config.grad_accum_steps, schedule),
                      in_shardings=(state_sharding, {k: batch_sharding for k in batch}),
                      out_shardings=(state_sharding, None), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
  return compiled, state, batch, mesh, model_cfg, time.perf_counter() - start, graphdef


def benchmark(config, steps: int = 10, warmup: int = 2,
              peak_tflops_per_device: float | None = None, audit: bool = False,
              routing_trace: bool = False) -> dict[str, Any]:
  """Times the train step of `config` (see the module docstring); returns the numbers. With
  `audit`, also the step's collectives (`moejax.audit`: kind x weights / activations /
  statistics) as `collectives` [(kind, class, bytes)] and the printable `audit_table`. With
  `routing_trace` (MoE configs), also what `config.routing_trace_every` costs: `trace_s` (one
  trace: the no-drop forward that records every token's experts, and the copy to the host) and
  `trace_bytes` (its compressed `.npz`, as training writes it)."""
  from moejax import audit as audit_lib  # pylint: disable=import-outside-toplevel
  from moejax.model import count_params  # pylint: disable=import-outside-toplevel
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps}, warmup={warmup}; allowed: steps >= 1, warmup >= 0.")
  compiled, state, batch, mesh, model_cfg, compile_s, graphdef = compiled_step(config)
  B, L = config.batch_size, config.seq_len
  with jax.set_mesh(mesh):
    if audit:
      found = audit_lib.collectives(compiled)
      classes = audit_lib.classify(found, audit_lib.weight_shapes(state, mesh))
    times = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics["loss"])
      if i >= warmup:
        times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  trace = (_time_routing_trace(state, batch, mesh, model_cfg, graphdef, steps)
           if routing_trace else {})
  counts = count_params(model_cfg, L)
  out = {"devices": jax.device_count(), "compile_s": compile_s, "step_s": step_s,
         "tokens_per_s": B * L / step_s, "flops_per_token": counts.flops_per_token,
         "active_params": counts.active, "total_params": counts.total,
         "loss": float(metrics["loss"]), **trace}
  if audit:
    out["collectives"] = [(c.kind, cls, c.bytes) for c, cls in zip(found, classes)]
    out["audit_table"] = audit_lib.format_table(found, classes)
  memory = compiled.memory_analysis()
  if memory is not None:
    out.update(argument_bytes=memory.argument_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
               output_bytes=memory.output_size_in_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
  peak = peak_tflops_per_device or peak_tflops(jax.devices()[0].device_kind)
  if peak:
    out["peak_tflops_per_device"] = peak
    out["mfu"] = counts.flops_per_token * out["tokens_per_s"] / (peak * 1e12 * out["devices"])
  return out


def _time_routing_trace(state, batch, mesh, model_cfg, graphdef,
                        repeats: int) -> dict[str, float]:
  """Median seconds of one routing trace of `batch` (`moejax.train`'s trace function, compiled
  alike) and the bytes of its `.npz`."""
  import functools  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  if not model_cfg.moe_layer_indices:
    raise ValueError("--routing_trace: the config has no MoE layer; allowed: an MoE config.")
  with jax.set_mesh(mesh):
    trace_fn = jax.jit(functools.partial(train._routes_of,  # pylint: disable=protected-access
                                         graphdef=graphdef))
    routes = jax.device_get(trace_fn(state, batch))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      routes = jax.device_get(trace_fn(state, batch))
      times.append(time.perf_counter() - start)
  buffer = io.BytesIO()
  dtype = np.uint8 if model_cfg.moe_config().num_experts <= 256 else np.int32
  np.savez_compressed(buffer, mask=np.ones(batch["mask"].shape, bool),
                      **{f"layer{i}": np.asarray(r, dtype) for i, r in routes.items()})
  return {"trace_s": statistics.median(times), "trace_bytes": buffer.tell()}


def format_report(config, out: dict[str, float]) -> str:
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  lines = [f"device: {jax.devices()[0].device_kind} x {out['devices']}, mesh {dict(config.mesh)}",
           f"model: {out['total_params'] / 1e6:,.1f}M params, {out['active_params'] / 1e6:,.1f}M "
           f"active, {out['flops_per_token'] / 1e6:,.1f} MFLOPs/token (train); batch "
           f"{config.batch_size} x {config.seq_len}, dtype {config.model.dtype}",
           f"compile: {out['compile_s']:.1f} s",
           f"step: {out['step_s'] * 1e3:.1f} ms (median), {out['tokens_per_s']:,.0f} tokens/s",
           f"loss after the timed steps: {out['loss']:.4f}"]
  if "argument_bytes" in out:
    lines.append(f"memory per device: arguments {gib(out['argument_bytes'])}, temporaries "
                 f"{gib(out['temp_bytes'])}, outputs {gib(out['output_bytes'])}")
  if "peak_bytes_in_use" in out:
    lines.append(f"device peak bytes in use: {gib(out['peak_bytes_in_use'])}")
  lines.append(f"MFU: {out['mfu']:.1%} of {out['peak_tflops_per_device']:g} TFLOP/s per device"
               if "mfu" in out else "MFU: no peak FLOP/s known for this device (--peak_tflops)")
  if "trace_s" in out:
    every = config.get("routing_trace_every") or 100
    lines.append(f"routing trace: {out['trace_s'] * 1e3:.1f} ms each (no-drop forward of one "
                 f"batch + host copy), {out['trace_bytes'] / 1024:.1f} KiB on disk; at "
                 f"routing_trace_every={every}: +{out['trace_s'] / (every * out['step_s']):.2%} "
                 "of training time")
  if "audit_table" in out:
    lines += ["collectives of one train step (per device):", out["audit_table"]]
  return "\n".join(lines)


def serve(config) -> None:
  """Worker of `compare`: compiles the step of `config`, prints one JSON line, then for every
  integer n read from stdin runs n steps and prints `{"seconds", "loss", "steps"}`."""
  import moejax  # pylint: disable=import-outside-toplevel
  compiled, state, batch, mesh, _, compile_s, _ = compiled_step(config)
  print(json.dumps({"ready": True, "compile_s": compile_s, "moejax": moejax.__file__}), flush=True)
  done = 0
  with jax.set_mesh(mesh):
    for line in sys.stdin:
      n = int(line)
      if n < 1:  # nothing to run (--warmup=0)
        print(json.dumps({"seconds": 0.0, "loss": None, "steps": done}), flush=True)
        continue
      start = time.perf_counter()
      for _ in range(n):
        state, metrics = compiled(state, batch)
      loss = float(metrics["loss"])  # waits for the last step
      done += n
      print(json.dumps({"seconds": time.perf_counter() - start, "loss": loss, "steps": done}),
            flush=True)


def compare(revisions: list[str], rounds: int, steps: int, warmup: int) -> str:
  """Tokens/s of the same command at several git revisions, in interleaved rounds.

  Each revision's tree is exported (`git archive`; "." = the working tree as it is) to a temporary
  directory, and one worker process per revision (`--serve`, with that tree's `moejax` and
  `configs`) compiles its step. Then, `rounds` times, each worker in turn runs `steps` steps while
  the others wait: a change of machine load lands on every revision alike. Prints the median
  tokens/s of each, the ratio to the first, and each one's loss after the same number of steps
  (equal numbers = the same math)."""
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                        check=True).stdout.strip()
  me = os.path.abspath(__file__)
  passed = [a for a in sys.argv[1:] if not a.startswith(("--revisions", "--rounds", "--steps",
                                                         "--warmup"))]
  workers, trees = {}, []
  try:
    for rev in revisions:
      if rev == ".":
        tree = repo
      else:
        tree = tempfile.mkdtemp(prefix="bench_train_")
        trees.append(tree)
        archive = subprocess.run(["git", "-C", repo, "archive", rev], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
      env = {**os.environ, "PYTHONPATH": tree}
      log = tempfile.NamedTemporaryFile("w", prefix=f"bench_train_{rev}_", suffix=".log",
                                        delete=False)
      workers[rev] = subprocess.Popen([sys.executable, me, "--serve", *passed], cwd=tree,
                                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log, text=True)
      ready = json.loads(workers[rev].stdout.readline() or "{}")
      if not ready.get("ready"):
        raise RuntimeError(f"revision {rev}: the worker failed to start; its log: {log.name}")
      if not ready["moejax"].startswith(tree):
        raise RuntimeError(f"revision {rev}: imported {ready['moejax']}, not its own tree")

    def run(rev, n):
      workers[rev].stdin.write(f"{n}\n")
      workers[rev].stdin.flush()
      return json.loads(workers[rev].stdout.readline())

    for rev in revisions:
      run(rev, warmup)
    times = {rev: [] for rev in revisions}
    last = {}
    for r in range(rounds):
      order = revisions if r % 2 == 0 else revisions[::-1]
      for rev in order:
        last[rev] = run(rev, steps)
        times[rev].append(last[rev]["seconds"] / steps)
  finally:
    for proc in workers.values():
      proc.kill()
    for tree in trees:
      shutil.rmtree(tree, ignore_errors=True)
  config = _CONFIG.value
  tokens = config.batch_size * config.seq_len
  base = statistics.median(times[revisions[0]])
  lines = [f"# {' '.join(passed)}: {rounds} interleaved rounds of {steps} steps "
           f"(+{warmup} warm-up), {jax.devices()[0].device_kind}",
           f"{'revision':<12} {'step ms':>9} {'tokens/s':>10} {'min..max tok/s':>17} "
           f"{'speed-up':>8}  loss after {last[revisions[0]]['steps']} steps"]
  for rev in revisions:
    t = statistics.median(times[rev])
    lo, hi = tokens / max(times[rev]), tokens / min(times[rev])
    lines.append(f"{rev:<12} {1e3 * t:>9.1f} {tokens / t:>10,.0f} {lo:>8,.0f}..{hi:<8,.0f} "
                 f"{base / t:>8.2f}  {last[rev]['loss']:.9g}")
  return "\n".join(lines)


def main(argv):
  del argv
  if _SERVE.value:
    serve(_CONFIG.value)
    return
  if _REVISIONS.value:
    print(compare(_REVISIONS.value, _ROUNDS.value, _STEPS.value, _WARMUP.value))
    return
  out = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK.value, _AUDIT.value,
                  _TRACE.value)
  print(format_report(_CONFIG.value, out))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ".")
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]",
                                            lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up).")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
  _PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device (default: by kind).")
  _AUDIT = flags.DEFINE_bool("audit", False, "Also print the step's collectives.")
  _TRACE = flags.DEFINE_bool("routing_trace", False, "Also time one routing trace "
                             "(config.routing_trace_every) and its size on disk (MoE configs).")
  _REVISIONS = flags.DEFINE_list(
      "revisions", None, "Compare git revisions (e.g. 054c109,.): tokens/s of each in "
      "interleaved rounds of --steps steps ('.' = the working tree).")
  _ROUNDS = flags.DEFINE_integer("rounds", 5, "With --revisions: interleaved rounds.")
  _SERVE = flags.DEFINE_bool("serve", False, "Internal: the worker of --revisions.")
  flags.mark_flags_as_required(["config"])
  from moejax import cli  # pylint: disable=import-outside-toplevel
  app.run(lambda argv: cli.run(main, argv), flags_parser=cli.parse_flags)
