"""Device mesh and the sharding decisions, in one place.

moejax uses a 2-D mesh with named axes (`data`, `expert`), the GShard / t5x MoE layout:

- token batches (and hence routing groups) are sharded over *both* axes, so every device holds
  distinct tokens;
- expert weights `[E, ...]` are sharded over `expert`; everything else (attention, dense MLPs,
  embeddings, the router) is replicated.

A tensor/`model` axis is not implemented yet. Layers name mesh axes directly in their parameters'
`out_sharding` metadata (the MoE layer: experts over `expert`, the router replicated); logical axis
names with a rules table (t5x style) are not built yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
EXPERT = "expert"
MESH_AXES = (DATA, EXPERT)

# The batch dimension of every token tensor is split over both axes (GShard / t5x MoE layout).
BATCH_AXES = (DATA, EXPERT)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process JAX job (call before any other JAX call).

  On Cloud TPU (and Slurm / Open MPI) call it with no arguments: JAX detects the cluster. Other
  clusters pass all three (`coordinator_address` like "10.0.0.1:1234" of process 0). A single
  process (`num_processes` None or 1, nothing detected) is a no-op. On CPU the cross-process
  collectives use gloo.
  """
  if num_processes == 1 or (num_processes is None and coordinator_address is None
                            and not _cluster_detected()):
    return
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _cluster_detected() -> bool:
  import os  # pylint: disable=import-outside-toplevel
  return any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                                       "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"))


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills in at most one `-1` ("the rest") and checks the product equals `num_devices`.

  Raises ValueError naming the axis and the value when the shape cannot fit the devices.
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; allowed axes are {MESH_AXES}.")
  shape = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  for axis, size in shape.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size}: an axis size must be a positive integer or -1 (the rest).")
  free = [axis for axis, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got -1 for {free}.")
  known = math.prod(size for size in shape.values() if size != -1)
  if free:
    if num_devices % known:
      raise ValueError(
          f"mesh: the fixed axes {shape} multiply to {known}, which does not divide the "
          f"{num_devices} available devices, so mesh.{free[0]}=-1 cannot be filled in.")
    shape[free[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"mesh: axis sizes {shape} multiply to {known}, but {num_devices} devices are "
        "available; the product must equal the device count (use -1 for 'the rest').")
  return shape


def parse_mesh(text: str) -> dict[str, int]:
  """`"data=-1,expert=4"` -> `{"data": -1, "expert": 4}` (command-line `--mesh`)."""
  out = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    axis, _, size = item.partition("=")
    if axis not in MESH_AXES or not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: {item!r} is not AXIS=SIZE; allowed axes {MESH_AXES}, "
                       "sizes positive integers or -1 (the rest), e.g. 'data=-1,expert=4'.")
    out[axis] = int(size)
  return out


def make_mesh(shape: dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (`data`, `expert`) mesh; `shape` like `{'data': -1, 'expert': 4}`.

  Works unchanged on 1 CPU, fake CPU devices, a GPU, a TPU slice or several hosts (it uses
  `jax.devices()`, the global device list). Axes are `Auto`: layers state shardings through
  `out_sharding` metadata and `jax.shard_map`, the compiler propagates the rest.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape or {DATA: -1}, len(devices))
  axis_shapes = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_spec(ndim: int = 2) -> P:
  """PartitionSpec of a `[B, ...]` token tensor: batch over (`data`, `expert`)."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """NamedSharding of a `[B, ...]` token tensor on `mesh`."""
  return NamedSharding(mesh, batch_spec(ndim))


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split (data x expert)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def moe_layout_problem(num_experts: int, num_groups: int, mesh_shape: dict[str, int]
                       ) -> tuple[str, str] | None:
  """The one check that experts and routing groups tile the mesh (used by the MoE layer at trace
  time and by `train.validate_config` before compiling). Returns (what is wrong, what is allowed)
  or None: experts must split evenly over `expert`, groups over data x expert."""
  ep = mesh_shape.get(EXPERT, 1)
  shards = math.prod(mesh_shape.get(axis, 1) for axis in BATCH_AXES)
  if num_experts % ep:
    return (f"num_experts={num_experts} is not divisible by the mesh's expert axis size {ep}",
            f"a multiple of {ep}")
  if num_groups % shards:
    return (f"G={num_groups} routing groups, not divisible by the {shards} devices of mesh axes "
            f"{BATCH_AXES}", "batch and group sizes such that the number of groups is a multiple "
            "of data x expert")
  return None


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """ValueError unless `batch_size` splits evenly over the batch axes of `mesh`."""
  shards = num_batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(
        f"{field}={batch_size} must be divisible by data x expert = {shards} "
        f"(mesh {dict(mesh.shape)}): every device holds an equal slice of the batch.")
