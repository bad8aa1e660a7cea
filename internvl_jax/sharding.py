"""Device mesh, logical-to-mesh axis rules, and shardings for params, optimizer state and batches.

Models name the logical axes of their params and activations; this module alone maps them to the
mesh axes "data" (pure data parallel), "fsdp" (data parallel with params and optimizer state
sharded, ZeRO-3 style) and "tensor" (Megatron-style tensor parallel), through one rule table,
`RULES`, whose entries a config overrides (`MeshConfig.rules`).
"""

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; "tensor" devices see the same rows

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The one logical-axis vocabulary, in MaxText's manner: a name means the same wherever a model
# uses it, so a kernel and the activation it produces always agree, and a tower has a name of its
# own only where it shards differently. Activations are split over the batch and, tensor
# parallel, over the features a kernel produces; params over their width (FSDP) and, tensor
# parallel, over heads, MLP and vocabulary.
RULES: Rules = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vit_heads", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    # InternViT's attention: its 25 heads divide badly over any tensor axis, so it is not tensor
    # parallel, while its MLP (12800 = 2^9 * 25 wide) is.
    ("vit_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes, one of them may be -1 for "all the devices the others leave"; and the
  logical-axis rules.

  `rules` are searched before `RULES`, and the first rule for a name whose mesh axes the array
  has not used yet wins (flax's order), so an override lists only what it changes, e.g.
  `--set "train.mesh.rules=(('mlp', None),)"` keeps every MLP whole.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: Rules = ()

  def __post_init__(self):
    vocabulary = [name for name, _ in RULES]
    for name, axes in self.rules:
      if name not in vocabulary:
        raise ValueError(f"MeshConfig.rules: unknown logical axis {name!r}; the names are "
                         f"{vocabulary}.")
      named = (axes,) if isinstance(axes, str) else axes or ()
      unknown = [a for a in named if a not in MESH_AXES]
      if unknown:
        raise ValueError(f"MeshConfig.rules: {name!r} maps to {unknown}, which are not mesh axes "
                         f"{MESH_AXES}.")

  @property
  def logical_rules(self) -> Rules:
    """The overrides, then the default table."""
    return self.rules + RULES

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = (self.data, self.fsdp, self.tensor)
    named = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"MeshConfig({named}): sizes must be positive, or -1 for the rest.")
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig({named}): at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"MeshConfig({named}): the fixed axes ({known} devices) do not divide the "
            f"{num_devices} devices.")
      return tuple(num_devices // known if s == -1 else s for s in sizes)
    if known != num_devices:
      raise ValueError(
          f"MeshConfig({named}) needs {known} devices, but there are {num_devices}; set one "
          f"axis to -1 to use the rest.")
    return sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh over `devices` (default: every process's devices).

  Axes are Auto: linen's logical sharding constraints need the compiler to propagate shardings.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(config.shape(len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def is_multi_process_environment(env: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment describes more than one process (the launchers JAX knows)."""
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(count, "1")) > 1:
      return True
  tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  return len(tpu_hosts.split(",")) > 1


# Seconds without a heartbeat after which JAX's coordination service declares a process dead and
# stops the others with a message naming it (JAX's default is 100).
HEARTBEAT_TIMEOUT_ENV = "INTERNVL_HEARTBEAT_TIMEOUT_S"


def maybe_initialize_distributed(enabled: bool | None = None,
                                 env: Mapping[str, str] = os.environ) -> bool:
  """Connects the processes of a multi-host run; a single process needs nothing.

  One code path for every cluster: `jax.distributed.initialize()` without arguments, which reads
  the coordinator, process count and id from the environment (Cloud TPU metadata, SLURM, Open
  MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). `enabled=None` decides
  from the environment; on a TPU pod whose environment names no other hosts, pass True. Must run
  before anything touches the devices. Returns whether the distributed runtime is up.

  When a process dies, the coordination service misses its heartbeats and, after
  $INTERNVL_HEARTBEAT_TIMEOUT_S seconds (default JAX's 100), terminates every other process with
  a message that names the missing one, so that no process waits in a collective forever.
  """
  if jax.distributed.is_initialized():
    return True
  if enabled is None:
    enabled = is_multi_process_environment(env)
  if not enabled:
    return False
  num_processes, process_id = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
  heartbeat = env.get(HEARTBEAT_TIMEOUT_ENV)
  jax.distributed.initialize(
      num_processes=int(num_processes) if num_processes else None,
      process_id=int(process_id) if process_id else None,
      **({"heartbeat_timeout_seconds": int(heartbeat)} if heartbeat else {}))
  return True


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules):
  """The mesh and logical rules that `nn.with_logical_constraint` in models reads at trace time.

  Enter it around the first call of a jitted function (when it traces), or around the call always.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _mesh_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def param_shardings(abstract_params, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of boxed (`nn.Partitioned`) params, e.g. from `jax.eval_shape`.

  Unboxed leaves are replicated. A sharded dimension must divide evenly; the error names the
  param to change.
  """
  def sharding(path, leaf):
    spec = nn.logical_to_mesh_axes(nn.get_partition_spec(leaf), rules)
    shape = nn.meta.unbox(leaf).shape
    for dim, axes in zip(shape, spec):
      if axes is not None and dim % _mesh_size(mesh, axes):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ValueError(
            f"param {name} {tuple(shape)}: a dimension of {dim} cannot be split over mesh axes "
            f"{axes} ({_mesh_size(mesh, axes)} devices, mesh {dict(mesh.shape)}); change the mesh "
            f"or the logical rules.")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      sharding, abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def sharded_init(init_fn: Callable, mesh: Mesh, rules: Rules, *args):
  """Runs `init_fn(*args)` (which returns boxed params) with every param created in its shards.

  `jax.eval_shape` finds the shapes and logical names without allocating; the jitted init then
  writes each device's shard directly, so no host ever holds a full copy. Returns the unboxed
  params and their shardings.
  """
  shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
  params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def opt_state_shardings(tx: optax.GradientTransformation, params, shardings, mesh: Mesh):
  """Shardings for `tx`'s state: every param-shaped leaf like its param, the rest replicated."""
  abstract_state = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state, shardings,
      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def sharded_opt_init(tx: optax.GradientTransformation, params, shardings, mesh: Mesh):
  """The optimizer state created in the params' shards; returns it and its shardings."""
  state_shardings = opt_state_shardings(tx, params, shardings, mesh)
  return jax.jit(tx.init, out_shardings=state_shardings)(params), state_shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ("data", "fsdp"); every other axis replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def host_to_global(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of every array become its part of a global array sharded like
  `batch_sharding`; the global batch is all processes' host batches, in process order."""
  return {name: jax.make_array_from_process_local_data(batch_sharding(mesh), value)
          for name, value in host_batch.items()}
