"""Per-example dropout masks, bit-identical to jax.random.bernoulli, in one fused kernel.

Why: JAX lowers its threefry primitive on CPU as a rolled 5-iteration while loop (to keep
compile times down), so every dropout mask costs a loop of small kernels plus copies; in the
digits local step (19 masks: 12 in the denoising pass, 7 in the classifier pass) that was
17.6 ms of 252 ms of kernel time on one device. Written out as plain uint32 arithmetic, XLA
fuses the 20 rounds and the mask compare into one elementwise kernel: 4-6x faster per mask
(benchmarks/README.md), and the masks equal `jax.random.bernoulli(fold_in(key, i), p, shape)`
bit for bit (tests/test_dropout.py), so training numbers do not change.

Threefry-2x32 (Salmon et al., SC'11, 20 rounds) is the hash behind JAX's default PRNG. The
bit layout reproduced here is JAX's partitionable one (`jax_threefry_partitionable`, the
default): counter = the flat element index split into (hi, lo) words, bits = out1 ^ out2.
Keys of any other PRNG implementation take the plain jax.random path.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x: Array, d: int) -> Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
  """The Threefry-2x32 block function on broadcastable uint32 arrays (keys k, counters x)."""
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):                        # 5 x 4 rounds, a key injection after each 4
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = _rotl(x2, r) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _is_threefry(key: Array) -> bool:
  return str(jax.random.key_impl(key)) == "threefry2x32"


def _keep_threshold(p_keep: float) -> np.uint32:
  """jax.random.uniform maps 32 bits to (bits >> 9) / 2**23 exactly, so u < p is an integer
  compare of the top 23 bits against ceil(p * 2**23) (p as float32, as bernoulli casts it)."""
  return np.uint32(math.ceil(float(np.float32(p_keep)) * 2 ** 23))


def example_keep_masks(key: Array, index: Array, shape: tuple[int, ...],
                       p_keep: float) -> Array:
  """bool [n, *shape]: row j equals bernoulli(fold_in(key, index[j]), p_keep, shape)."""
  index = jnp.asarray(index).astype(jnp.uint32)
  n = index.shape[0]
  if not _is_threefry(key) or math.prod(shape) >= 2 ** 32:
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
    return jax.vmap(lambda k: jax.random.bernoulli(k, p_keep, shape))(keys)
  k1, k2 = jax.random.key_data(key)
  # fold_in(key, i) hashes the counter pair (0, i) under key. (XLA fuses these per-example
  # keys, and the mask, into each consumer kernel, so they are recomputed per element and in
  # the backward pass; materialising them once measured no faster.)
  f1, f2 = threefry2x32(k1, k2, jnp.zeros_like(index), index)
  col = (n,) + (1,) * len(shape)
  flat = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)   # element counters
  b1, b2 = threefry2x32(f1.reshape(col), f2.reshape(col), jnp.zeros_like(flat), flat)
  return ((b1 ^ b2) >> np.uint32(9)) < _keep_threshold(p_keep)
