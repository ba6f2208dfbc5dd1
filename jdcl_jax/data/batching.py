"""Deterministic, stateless batch indices and host -> global device arrays.

The index stream of one (seed, task, stage) is an endless concatenation of
random permutations of range(N), one per epoch, each seeded from
(seed, task, stage, epoch). Batch `step` is stream[step*B:(step+1)*B], so a
batch may straddle two epochs, exactly as torch's RandomSampler(num_samples > N)
with a BatchSampler(drop_last=True) behaves (the reference anchor's sampler);
the incomplete last batch is never formed because the stream never ends. The
batch is a pure function of its arguments: resuming at a checkpointed step
reproduces it without any iterator state.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Union

import jax
import numpy as np

Stage = Union[int, str]


def _stage_id(stage: Stage) -> int:
  # crc32 is stable across processes and Python versions (hash() is salted).
  return zlib.crc32(stage.encode()) if isinstance(stage, str) else int(stage)


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, task: int, stage_id: int, epoch: int, n: int) -> np.ndarray:
  rng = np.random.default_rng([seed, task, stage_id, epoch])
  perm = rng.permutation(n)
  perm.flags.writeable = False  # cached: callers must not mutate it
  return perm


def batch_indices(seed: int, task: int, stage: Stage, step: int,
                  num_examples: int, batch_size: int) -> np.ndarray:
  """Indices (into range(num_examples)) of batch `step`; int64, length B."""
  if num_examples < 1 or batch_size < 1 or step < 0:
    raise ValueError(f"bad arguments: num_examples={num_examples}, "
                     f"batch_size={batch_size}, step={step}")
  start, stop = step * batch_size, (step + 1) * batch_size
  stage_id = _stage_id(stage)
  parts = []
  for epoch in range(start // num_examples, (stop - 1) // num_examples + 1):
    perm = _permutation(seed, task, stage_id, epoch, num_examples)
    lo = max(start - epoch * num_examples, 0)
    hi = min(stop - epoch * num_examples, num_examples)
    parts.append(perm[lo:hi])
  return np.concatenate(parts).astype(np.int64)


def ssl_batch_indices(seed: int, task: int, step: int, num_labelled: int,
                      num_unlabelled: int, labelled_batch: int,
                      mu: int = 7) -> tuple[np.ndarray, np.ndarray]:
  """Labelled and unlabelled batch indices of one semi-supervised step.

  The two streams are independent and each cycles over its own set, which is
  what Lightning's "max_size_cycle" does with the two reference loaders.
  """
  return (batch_indices(seed, task, "ssl_labelled", step, num_labelled,
                        labelled_batch),
          batch_indices(seed, task, "ssl_unlabelled", step, num_unlabelled,
                        mu * labelled_batch))


def host_slice(a: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch (all of it with one process)."""
  return np.array_split(a, jax.process_count())[jax.process_index()]


def to_global_batch(np_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host-local numpy pytree -> jax.Arrays laid out by `sharding`.

  Each process passes its own slice of the global batch (all of it with one
  process). Building from numpy through make_array_from_process_local_data
  avoids the multi-process device_put pitfall (JAX_STACK pitfall 11).
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      np_batch)
