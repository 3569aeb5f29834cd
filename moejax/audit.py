"""Communication audit: every collective in a compiled XLA program, with its size.

    report = audit.collectives(jax.jit(step).lower(*args).compile())
    print(audit.format_table(report))

The compiled (post-SPMD-partitioning) HLO holds per-device shapes, so `bytes` is what one device
sends or receives per execution of the op. For capacity-based MoE the forward pass of a layer
should show exactly two `all-to-all`s of `E * g*C * D * dtype_bytes` each (`g` = local groups;
the capacity buffer there and back: the physical floor) plus one small `all-reduce` of routing
statistics, and no all-gather / all-reduce of token activations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
               "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
# `%name = <result shape> <op>(` where op may carry an async `-start` suffix.
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?)"
                    r"\s+(?P<op>[a-z\-]+?)(?:-start)?\(")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{(?P<groups>(?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(?P<num>\d+),(?P<size>\d+)\]")
_ARRAY_RE = re.compile(r"(?P<dtype>[a-z]+\d*(?:e\dm\d(?:fn)?)?)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # e.g. "all-to-all"
  bytes: int  # result bytes per device
  shapes: tuple[str, ...]  # result array shapes, e.g. ("f32[2,4,24]", ...)


def shape_bytes(shape: str) -> tuple[int, tuple[str, ...]]:
  """Total bytes and the array shapes in an HLO result shape (array or tuple)."""
  total, arrays = 0, []
  for m in _ARRAY_RE.finditer(shape):
    dtype, dims = m.group("dtype"), m.group("dims")
    if dtype not in _DTYPE_BYTES:
      continue
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += size * _DTYPE_BYTES[dtype]
    arrays.append(f"{dtype}[{dims}]")
  return total, tuple(arrays)


def _is_trivial(line: str) -> bool:
  """True when every replica group has one device: the op moves nothing (a size-1 mesh axis)."""
  m = _GROUPS_IOTA_RE.search(line)
  if m:
    return int(m.group("size")) == 1
  m = _GROUPS_LIST_RE.search(line)
  if m:
    groups = re.findall(r"\{([\d,]*)\}", m.group("groups"))
    return bool(groups) and all(len([d for d in g.split(",") if d]) <= 1 for g in groups)
  return False


def collectives(compiled_or_text: Any) -> list[Collective]:
  """Every collective op in a compiled program (or its HLO text), in program order.

  Ops whose replica groups are all single devices (left behind by size-1 mesh axes) move no
  data and are skipped.
  """
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  found = []
  for line in text.splitlines():
    m = _OP_RE.match(line)
    if m and m.group("op") in COLLECTIVES and not _is_trivial(line):
      size, arrays = shape_bytes(m.group("shape"))
      found.append(Collective(m.group("op"), size, arrays))
  return found


def summarize(found: list[Collective]) -> dict[str, dict[str, int]]:
  """`{kind: {"count": n, "bytes": total bytes per device}}`."""
  out: dict[str, dict[str, int]] = {}
  for c in found:
    entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += c.bytes
  return out


def format_table(found: list[Collective], classes: list[str] | None = None) -> str:
  """Count and bytes per collective kind; with `classes` (from `classify`), per (kind, class)."""
  if classes is None:
    lines = [f"{'collective':<20} {'count':>5} {'bytes/device':>14}"]
    for kind, entry in sorted(summarize(found).items()):
      lines.append(f"{kind:<20} {entry['count']:>5} {entry['bytes']:>14,}")
    return "\n".join(lines)
  rows: dict[tuple[str, str], list[int]] = {}
  for c, cls in zip(found, classes):
    row = rows.setdefault((c.kind, cls), [0, 0])
    row[0] += 1
    row[1] += c.bytes
  lines = [f"{'collective':<20} {'of':<12} {'count':>5} {'bytes/device':>14}"]
  for (kind, cls), (count, size) in sorted(rows.items()):
    lines.append(f"{kind:<20} {cls:<12} {count:>5} {size:>14,}")
  return "\n".join(lines)


def weight_shapes(state: Any, mesh: Any) -> set[tuple[int, ...]]:
  """Per-device shapes a parameter or optimizer moment can have in a collective: its shard (a
  gradient all-reduce or reduce-scatter), and its shard gathered over `fsdp` (ZeRO-3's gather)."""
  import jax  # pylint: disable=import-outside-toplevel
  out = set()
  for x in jax.tree.leaves(state):
    spec = tuple(x.sharding.spec) + (None,) * x.ndim
    for gathered in ((), ("fsdp",)):
      dims = []
      for size, axes in zip(x.shape, spec[:x.ndim]):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        dims.append(size // math.prod(mesh.shape[a] for a in axes if a not in gathered))
      out.add(tuple(dims))
  return out


def classify(found: list[Collective], weight_shapes_: set[tuple[int, ...]],
             small_bytes: int = 4096) -> list[str]:
  """Each collective as `weights` (every array shaped like a parameter's shard or fsdp-gathered
  shard: ZeRO-3 gathers, gradient reductions), else `statistics` (at most `small_bytes`: losses,
  routing counts) or `activations` (the rest). A shape match is a heuristic: an activation that
  happens to have a weight's shape would count as a weight."""
  def dims(shape: str) -> tuple[int, ...]:
    inner = shape[shape.index("[") + 1:shape.index("]")]
    return tuple(int(d) for d in inner.split(",") if d)
  out = []
  for c in found:
    if c.shapes and all(dims(a) and dims(a) in weight_shapes_ for a in c.shapes):
      out.append("weights")
    elif c.bytes <= small_bytes:
      out.append("statistics")
    else:
      out.append("activations")
  return out
