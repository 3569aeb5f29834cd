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


# ----------------------------------------------------------------------------------------------
# Lowering audit: what a program becomes on TPU / GPU, read on a CPU machine
# ----------------------------------------------------------------------------------------------
#
# `jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))` (or "cuda") lowers for a platform
# that is not present, to the StableHLO module that XLA:TPU / XLA:GPU would compile (what
# `jax.export` serialises). `lowered_ops` walks it: every matmul (dense `dot_general`, or grouped
# `chlo.ragged_dot`, with its FLOPs) and every collective that moves data. A composite op
# (`chlo.ragged_dot`) carries a decomposition function, a dense fallback for compilers without
# the op (`@chlo.ragged_dot.impl*`), which the accelerator backends replace by their
# grouped-matmul kernel: ops inside such bodies are skipped.

LOWERED_COLLECTIVES = ("all_to_all", "ragged_all_to_all", "all_reduce", "all_gather",
                       "reduce_scatter", "collective_permute")
_CONTRACT_RE = re.compile(r"lhs_contracting_dimensions = \[([\d,\s]*)\]")
_MLIR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "ui32": 4, "i64": 8, "i1": 1,
               "i8": 1, "ui8": 1, "i16": 2, "ui16": 2, "ui64": 8, "f8E4M3FN": 1, "f8E5M2": 1}


@dataclasses.dataclass(frozen=True)
class LoweredOp:
  name: str  # dot_general, ragged_dot, all_to_all, ragged_all_to_all, all_reduce, ...
  flops: int  # matmuls: 2 * (output elements) * (contracted size); 0 otherwise
  # collectives: bytes of the results per device; 0 otherwise. For ragged_all_to_all that is
  # its output buffer: an upper bound on what moves (only the sent rows travel).
  bytes: int
  result: str  # the (first) result type, e.g. "tensor<128x64xf32>"
  operand_shapes: tuple[tuple[int, ...], ...] = ()


def lower(fn, args: tuple, platform: str):
  """`fn(*args)` lowered for `platform` ("tpu" | "cuda" | "cpu") on this machine: the StableHLO
  module (an MLIR `ir.Module`). `args` may be `jax.ShapeDtypeStruct`s (with `sharding=` under a
  mesh)."""
  import jax  # pylint: disable=import-outside-toplevel
  traced = jax.jit(fn).trace(*args)
  return traced.lower(lowering_platforms=(platform,)).compiler_ir("stablehlo")


def _shape(value) -> tuple[tuple[int, ...], str]:
  t = value.type
  element = str(t.element_type) if hasattr(t, "element_type") else str(t)
  return tuple(getattr(t, "shape", ())), element


def _func_name(op) -> str:
  parent = op.parent
  while parent is not None:
    if parent.name == "func.func":
      return str(parent.attributes["sym_name"]).strip('"')
    parent = parent.parent
  return ""


def _moves_nothing(op) -> bool:
  """A collective whose replica groups all hold one device (left by size-1 mesh axes)."""
  try:
    groups = op.attributes["replica_groups"]
  except KeyError:
    return False
  shape = getattr(groups.type, "shape", ())
  return len(shape) == 2 and shape[1] == 1


def lowered_ops(module) -> list[LoweredOp]:
  """Matmuls and collectives of a StableHLO module from `lower` (see above), in program order,
  outside the decomposition bodies of composite ops and skipping collectives that move nothing."""
  from jax.extend.mlir import ir  # pylint: disable=import-outside-toplevel
  found = []

  def visit(op):
    name = op.name.split(".", 1)[-1]
    if op.name == "stablehlo.composite":
      name = str(op.attributes["name"]).strip('"').split(".", 1)[-1]
    elif op.name == "stablehlo.custom_call":
      name = str(op.attributes["call_target_name"]).strip('"')
    if name not in ("dot_general", "ragged_dot") + LOWERED_COLLECTIVES:
      return ir.WalkResult.ADVANCE
    if ".impl" in _func_name(op) or (name in LOWERED_COLLECTIVES and _moves_nothing(op)):
      return ir.WalkResult.ADVANCE
    out_dims, _ = _shape(op.results[0])
    flops = size = 0
    if name == "dot_general":
      lhs_dims, _ = _shape(op.operands[0])
      m = _CONTRACT_RE.search(str(op.attributes["dot_dimension_numbers"]))
      axes = [int(a) for a in m.group(1).split(",") if a.strip()] if m else []
      flops = 2 * math.prod(out_dims) * math.prod(lhs_dims[a] for a in axes)
    elif name == "ragged_dot":
      # Forward [M, K] x [E, K, N] -> [M, N], and the gradients' variants, hold the same three
      # tensors in some order, whose sizes multiply to E (M K N)^2; the work is 2 M K N.
      sizes = [math.prod(_shape(v)[0]) for v in (op.operands[0], op.operands[1], op.results[0])]
      groups = math.prod(_shape(op.operands[2])[0])
      flops = 2 * math.isqrt(math.prod(sizes) // groups)
    else:
      for result in op.results:
        dims, element = _shape(result)
        size += math.prod(dims) * _MLIR_BYTES.get(element, 4)
    found.append(LoweredOp(name, flops, size, str(op.results[0].type),
                           tuple(_shape(v)[0] for v in op.operands)))
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  return found


def format_lowered(ops: list[LoweredOp]) -> str:
  """One row per op kind: count, total matmul FLOPs or collective bytes, largest result."""
  rows: dict[str, list] = {}
  for op in ops:
    row = rows.setdefault(op.name, [0, 0, 0, "", -1])
    row[0] += 1
    row[1] += op.flops
    row[2] += op.bytes
    if op.flops + op.bytes > row[4]:
      row[3], row[4] = op.result, op.flops + op.bytes
  lines = [f"{'op':<18} {'count':>5} {'MFLOP':>10} {'bytes/device':>13}  largest result"]
  for name, (count, flops, size, largest, _) in sorted(rows.items()):
    lines.append(f"{name:<18} {count:>5} {flops / 1e6:>10.2f} {size:>13,}  {largest}")
  return "\n".join(lines)


def lower_moe_layer(cfg, d_model: int, shape_BL: tuple[int, int], mesh, platform: str):
  """Forward + backward (w.r.t. parameters and input; loss = sum(y^2) + aux loss) of one
  `MoELayer(cfg, d_model)` on a float32 `[B, L, d_model]` batch sharded over `mesh`'s batch axes,
  lowered for `platform` (see `lower`). Shapes only: nothing is initialised on a device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from moejax import sharding  # pylint: disable=import-outside-toplevel
  from moejax.moe import MoELayer  # pylint: disable=import-outside-toplevel
  with jax.set_mesh(mesh):
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: MoELayer(cfg, d_model, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def loss(params, x):
      y, aux = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(jnp.square(y.astype(jnp.float32))) + aux.loss

    x = jax.ShapeDtypeStruct((*shape_BL, d_model), jnp.float32,
                             sharding=sharding.batch_sharding(mesh, 3))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          params)
    return lower(jax.grad(loss, argnums=(0, 1)), (shapes, x), platform)


def lower_train_step(config, platform: str, devices=None):
  """One whole train step of `config` (model, optimizer, gradient accumulation, the MoE layers'
  dispatch and transport) lowered for `platform`, on the mesh `config.mesh` resolves to over
  `devices` (default: all local devices; fake CPU devices stand in for the accelerator's). Only
  shapes are traced: nothing is initialised or compiled."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from moejax import optim, sharding, train  # pylint: disable=import-outside-toplevel
  devices = list(jax.devices() if devices is None else devices)
  model_cfg = train.validate_config(config, len(devices))
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: train._new_model_and_optimizer(model_cfg, tx, config.seed)))  # pylint: disable=protected-access
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                         state)
    tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh, 2))
    batch = {key: tokens if key != "mask" else jax.ShapeDtypeStruct(
        tokens.shape, jnp.bool_, sharding=tokens.sharding) for key in train.BATCH_KEYS}
    step = train.make_train_step(graphdef, config.grad_accum_steps, schedule)
    return lower(step, (state, batch), platform)
