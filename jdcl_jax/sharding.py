"""Device mesh and the two shardings the trainer uses (replicated state, data-parallel batch)."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def available_cores() -> int:
  """CPU cores this process may run on (affinity-aware where the OS tells)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not Linux
    return os.cpu_count() or 1


def configure_cpu_devices(requested: int) -> int:
  """Ask JAX for `requested` virtual CPU devices; returns the number set.

  0 = one per core, rounded down to a power of two and capped at 8, so that the usual batch
  sizes (64, 200, 360, ...) split evenly.

  Must run before the first JAX computation (the CPU client is created once). A user's own
  --xla_force_host_platform_device_count in XLA_FLAGS wins; then nothing is changed and 0 is
  returned. Accelerator backends are unaffected: this only shapes the CPU client.
  """
  if requested < 0:
    raise ValueError(f"config.mesh.cpu_devices={requested} must be >= 0 (0 = one per core)")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  n = requested or min(8, 1 << (available_cores().bit_length() - 1))
  jax.config.update("jax_num_cpu_devices", n)
  return n


def make_mesh(num_data: int = -1) -> Mesh:
  """A 1-D mesh over the data axis. -1 = every device of every process."""
  devices = jax.devices()
  n = len(devices) if num_data in (-1, None) else int(num_data)
  if n < 1 or len(devices) % n:
    raise ValueError(f"mesh.data={num_data} does not divide the {len(devices)} available devices")
  # Auto axis type: jit in/out shardings drive propagation (Explicit mode rejects unsharded inputs
  # inside shard_map; JAX_STACK pitfall 8).
  return Mesh(np.asarray(devices[:n]), ("data",),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the data axis."""
  return NamedSharding(mesh, P("data"))


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """Place a host or device pytree replicated on the mesh (copies, so donation can't delete it)."""
  sh = replicated(mesh)
  return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sh), tree)


def abstract(tree: Any, sh: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves with sharding `sh` (None: uncommitted), for
  lowering or restoring without allocating."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be divisible by the {n} devices of the data axis")


def to_mesh(tree: Any, mesh: Mesh) -> Any:
  """The same (replicated) pytree on another mesh; a no-op when it is already there."""
  return jax.device_put(tree, replicated(mesh))


def spare_mesh(mesh: Mesh, pool: Mesh, batch_size: int) -> Mesh:
  """A 1-D data mesh over the devices of `pool` that `mesh` does not use, if the batch splits
  evenly over them; otherwise `mesh` itself. Student-independent work (the KD teachers) goes
  there, to run beside the train step."""
  used = set(mesh.devices.flat)
  spare = [d for d in pool.devices.flat if d not in used]
  if not spare or batch_size % len(spare) or jax.process_count() > 1:
    return mesh
  return Mesh(np.asarray(spare), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

