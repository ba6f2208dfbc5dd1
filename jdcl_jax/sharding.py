"""Device mesh and the two shardings the trainer uses (replicated state, data-parallel batch)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be divisible by the {n} devices of the data axis")
