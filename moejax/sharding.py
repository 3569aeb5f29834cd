"""Device mesh and the sharding decisions, in one place.

The mesh has four named axes, outermost first (the innermost gets the fastest links):

- `data`: pure data parallelism; parameters replicated over it.
- `fsdp`: data parallelism with parameters and optimizer state sharded over it (ZeRO-3); the
  compiler all-gathers a layer's weights where they are used and reduce-scatters their gradients.
- `expert`: expert parallelism (GShard): expert weights `[E, ...]` are sharded over it and the MoE
  layer moves the capacity buffer with `all_to_all` inside `jax.shard_map` (`moejax.moe`).
- `model`: tensor parallelism (Megatron): attention heads, the hidden width of dense MLPs and of
  every expert, and the vocabulary of the embedding / LM head are split over it.

Token batches (and hence routing groups) are split over `BATCH_AXES = (data, fsdp, expert)`, so
every device of a `model` group holds the same tokens and every other device distinct ones. Axes
of size 1 cost nothing; `make_mesh({"data": -1})` is plain data parallelism.

Parameters do not name mesh axes. They carry *logical* axis names (`embed`, `heads`, `mlp`,
`vocab`, `expert`, ...; `param(value, logical_axes)`), and `LOGICAL_AXIS_RULES` maps each logical
name to a mesh axis (t5x style) — the whole layout is that one table. A dimension whose size the
mesh axis does not divide is an error that names the parameter dimension and both sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
EXPERT = "expert"
MODEL = "model"
MESH_AXES = (DATA, FSDP, EXPERT, MODEL)

# The batch dimension of every token tensor is split over these (GShard / t5x MoE layout).
BATCH_AXES = (DATA, FSDP, EXPERT)

# Logical axis name -> mesh axis (None: replicated). Names not listed are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", FSDP),     # d_model of every weight matrix: ZeRO-3 sharding.
    ("vocab", MODEL),    # embedding table and LM head
    ("heads", MODEL),    # query heads
    ("kv_heads", MODEL),  # key/value heads (grouped-query attention: must divide too)
    ("mlp", MODEL),      # hidden width of the dense MLP and of each expert
    ("expert", EXPERT),  # the stacked expert weights
    ("head_dim", None),
    ("norm", None),
)


def logical_to_mesh_axes(logical_axes: Sequence[str | None],
                         mesh_axis_names: Sequence[str] | None = None,
                         rules=LOGICAL_AXIS_RULES) -> tuple[str | tuple[str, ...] | None, ...]:
  """Mesh axes of each dimension, by `rules`; mesh axes absent from `mesh_axis_names` (when given,
  e.g. a user's own 2-axis mesh) are dropped, and a mesh axis is used by one dimension at most."""
  table = dict(rules)
  used, out = set(), []
  for name in logical_axes:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used
                 and (mesh_axis_names is None or a in mesh_axis_names))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return tuple(out)


def spec_problem(shape: Sequence[int], logical_axes: Sequence[str | None],
                 mesh_shape: dict[str, int]) -> str | None:
  """Why `shape` cannot be laid out on a mesh of `mesh_shape` by the rules, or None."""
  for dim, (size, name, axes) in enumerate(zip(
      shape, logical_axes, logical_to_mesh_axes(logical_axes, tuple(mesh_shape)))):
    axes = (axes,) if isinstance(axes, str) else axes or ()
    ways = math.prod(mesh_shape[a] for a in axes)
    if size % ways:
      return (f"dimension {dim} ({name!r}, size {size}) is split over mesh axis "
              f"{'x'.join(axes)} of size {ways}, which does not divide it")
  return None


def param(value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
  """An `nnx.Param` laid out by `LOGICAL_AXIS_RULES`: its `out_sharding` metadata holds the mesh
  axes, `logical_axes` the names; created sharded when a mesh is set (`jax.set_mesh`)."""
  if len(logical_axes) != value.ndim:
    raise ValueError(f"logical_axes {logical_axes} has {len(logical_axes)} names for a "
                     f"parameter of shape {tuple(value.shape)}; allowed: one name per dimension.")
  mesh = jax.sharding.get_abstract_mesh()
  names = None if mesh.empty else mesh.axis_names
  if names is not None:
    problem = spec_problem(value.shape, logical_axes, dict(mesh.shape))
    if problem:
      raise ValueError(f"parameter of shape {tuple(value.shape)}, logical axes {logical_axes}: "
                       f"{problem}; allowed: sizes divisible by the mesh axis (change the "
                       f"model or the mesh {dict(mesh.shape)}).")
  return nnx.Param(value, out_sharding=logical_to_mesh_axes(logical_axes, names),
                   logical_axes=tuple(logical_axes), eager_sharding=names is not None)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """`with_sharding_constraint` by logical names under a set mesh; the identity without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(*logical_to_mesh_axes(logical_axes,
                                                                     mesh.axis_names)))


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
  """`"data=-1,expert=4"` -> `{"data": -1, "expert": 4}` (command-line `--mesh`); axes not
  named have size 1."""
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
  """Builds the (`data`, `fsdp`, `expert`, `model`) mesh; `shape` like `{'data': -1, 'expert': 4}`
  (axes not named have size 1).

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


def num_batch_shards(mesh: Mesh | jax.sharding.AbstractMesh | Mapping[str, int]) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes, for a mesh, an
  abstract mesh (1 if empty) or a {axis: size} shape; axes it lacks count 1."""
  shape = mesh if isinstance(mesh, Mapping) else ({} if mesh.empty else dict(mesh.shape))
  return math.prod(shape.get(axis, 1) for axis in BATCH_AXES)


def moe_layout_problem(num_experts: int, num_groups: int, mesh_shape: dict[str, int]
                       ) -> tuple[str, str] | None:
  """The one check that experts and routing groups tile the mesh (used by the MoE layer at trace
  time and by `train.validate_config` before compiling). Returns (what is wrong, what is allowed)
  or None: experts must split evenly over `expert`, groups over data x fsdp x expert."""
  ep = mesh_shape.get(EXPERT, 1)
  shards = num_batch_shards(mesh_shape)
  if num_experts % ep:
    return (f"num_experts={num_experts} is not divisible by the mesh's expert axis size {ep}",
            f"a multiple of {ep}")
  if num_groups % shards:
    return (f"G={num_groups} routing groups, not divisible by the {shards} devices of mesh axes "
            f"{BATCH_AXES}", "batch and group sizes such that the number of groups is a multiple "
            "of data x fsdp x expert")
  return None


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """ValueError unless `batch_size` splits evenly over the batch axes of `mesh`."""
  shards = num_batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(
        f"{field}={batch_size} must be divisible by data x fsdp x expert = {shards} "
        f"(mesh {dict(mesh.shape)}): every device holds an equal slice of the batch.")
