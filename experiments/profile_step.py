"""Where a train step's time goes: the XLA ops of the compiled step, by total time.

    python experiments/profile_step.py --config=configs/dense.py --steps=10
    python experiments/profile_step.py --config=configs/switch.py --steps=10 --top=25

Compiles the train step exactly as `experiments/bench_train.py` does (random tokens, state
donated), runs `--steps` steps under `jax.profiler.trace`, reads the trace back
(`jax.profiler.ProfileData`) and prints the host-side XLA op events grouped by op name: total ms
per step, share of the step, calls per step. On CPU the events are XLA:CPU's thunks (fusions,
dots, copies, ...); names are the HLO instruction names of the optimised module.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_train  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  compiled, state, batch, mesh, _, _, _ = bench_train.compiled_step(config)
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    trace_dir = tempfile.mkdtemp(prefix="moejax_profile_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics["loss"])
    wall = (time.perf_counter() - start) / _STEPS.value
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  totals, calls = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if name.startswith(("$", "Thunk", "PjRt", "Execute", "jit_", "TraceMe")) or ":" in name:
          continue
        totals[name] += event.duration_ns
        calls[name] += 1
  steps = _STEPS.value
  described = describe_ops(compiled.as_text())
  by_kind = collections.Counter()
  for name, ns in totals.items():
    by_kind[described.get(name, ("other", ""))[0]] += ns
  print(f"# {config.model.to_dict().get('moe_every') and 'MoE' or 'dense'} step of the config, "
        f"batch {config.batch_size} x {config.seq_len}: {1e3 * wall:.1f} ms/step wall "
        f"(profiled), {sum(totals.values()) / 1e6 / steps:.1f} ms/step in the ops listed below "
        f"and the rest (threads overlap)")
  total = sum(totals.values())
  print(f"{'kind':<12} {'ms/step':>8} {'share':>6}")
  for kind, ns in by_kind.most_common():
    print(f"{kind:<12} {ns / 1e6 / steps:>8.2f} {ns / total:>6.1%}")
  print()
  by_shape = collections.Counter()
  counts = collections.Counter()
  for name, ns in totals.items():
    kind, what = described.get(name, ("other", ""))
    key = f"{kind}: {re.sub(r'[{][^}]*[}]', '', what)}"
    by_shape[key] += ns
    counts[key] += calls[name]
  print(f"{'ms/step':>8} {'share':>6} {'ops':>4}  kind: what (same shapes summed)")
  for key, ns in by_shape.most_common(_TOP.value):
    print(f"{ns / 1e6 / steps:>8.2f} {ns / total:>6.1%} {counts[key] // steps:>4}  {key[:110]}")
  print()
  print(f"{'op':<28} {'kind':<11} {'ms/step':>8} {'share':>6}  what (matmul: lhs x rhs -> out)")
  for name, ns in totals.most_common(_TOP.value):
    kind, what = described.get(name, ("other", ""))
    print(f"{name[:28]:<28} {kind:<11} {ns / 1e6 / steps:>8.2f} {ns / total:>6.1%}  {what[:90]}")


_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\((.*)$")


def describe_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (kind, description) for the optimised module's text: `matmul` (a
  dot, alone or inside a fusion: its operand and result shapes), `copy` (copies and transposes:
  layout changes), `reduce`, `scatter`/`gather`, else `elementwise`."""
  computations: dict[str, list[tuple[str, str, str, str]]] = {}
  current = None
  for line in hlo.splitlines():
    head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      computations[current] = []
      continue
    m = _INSTR_RE.match(line)
    if m and current is not None:
      computations[current].append(m.groups())
  shapes = {name: shape for body in computations.values() for name, shape, _, _ in body}
  out = {}
  for body in computations.values():
    for name, shape, op, rest in body:
      ops = [op]
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      if called and called.group(1) in computations:
        ops += [o for _, _, o, _ in computations[called.group(1)]]
        inner = computations[called.group(1)]
      else:
        inner = [(name, shape, op, rest)]
      dots = [(n, sh, r) for n, sh, o, r in inner if o in ("dot", "convolution")]
      if dots:
        n, sh, r = dots[0]
        args = re.findall(r"%([\w.\-]+)", r.split("),")[0])
        what = " x ".join(shapes.get(a, "?") for a in args[:2]) + f" -> {sh}"
        out[name] = ("matmul", what + (f" (+{len(dots) - 1} dots)" if len(dots) > 1 else ""))
      elif any(o in ("copy", "transpose") for o in ops):
        out[name] = ("copy", shape)
      elif any(o in ("scatter", "gather", "dynamic-slice", "dynamic-update-slice") for o in ops):
        out[name] = ("gather", shape)
      elif any(o in ("reduce", "reduce-window") for o in ops):
        out[name] = ("reduce", shape)
      else:
        out[name] = ("elementwise", shape)
  return out


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ".")
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]",
                                            lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", 10, "Profiled steps.")
  _TOP = flags.DEFINE_integer("top", 30, "Ops to print.")
  flags.mark_flags_as_required(["config"])
  from moejax import cli  # pylint: disable=import-outside-toplevel
  app.run(lambda argv: cli.run(main, argv), flags_parser=cli.parse_flags)
