"""Winograd F(m x m, 3 x 3) convolution for 3x3, stride-1, padding-1 convs (CPU speed path).

A 3x3 conv computes each m x m output tile from a (m+2) x (m+2) input tile. Winograd's minimal
filtering (Lavin & Gray, 2016) transforms input tiles (B^T d B) and filters (G g G^T) so the tile
product becomes (m+2)^2 independent channel GEMMs, then maps the products back (A^T M A). F(2, 3)
needs 16 GEMM products per 4 outputs where the direct conv needs 36: 2.25x fewer multiplies, at
the cost of elementwise transforms that XLA fuses into a few memory-bound loops.

Why it exists: XLA:CPU runs each small conv on one thread, and on AVX2 hosts its conv weight
gradient is several times slower than the forward (issue 5). Here forward, input gradient and
weight gradient are all batched GEMMs with 2.25x fewer FLOPs. The backward is written by hand
(`jax.custom_vjp`): JAX's own transposes of the transforms compiled to loops 5-10x slower.
Measured on a 2-core AVX2 host (benchmarks/README.md): one conv's forward+backward 1.4-2.9x
faster than XLA's at batch 64 and 8x8, but the whole digits local step only ~10-20 % faster on
one device and no faster data-parallel on two, so it is opt-in (`model.conv_impl=winograd`).

All transforms are exact linear maps with small coefficients (0, +-1, +-1/2); F(2, 3) matches
`lax.conv_general_dilated` to ~1e-6 relative in float32 (tests/test_winograd.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# F(2, 3): the transforms of Lavin & Gray (2016), eq. (7).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
_M = _AT.shape[0]      # output tile side
_T = _BT.shape[0]      # input tile side = _M + 2


def supported(x_shape: Sequence[int], kernel_size: int, stride: int, padding: int) -> bool:
  """Whether a conv of this shape can run as Winograd F(2, 3)."""
  h, w = x_shape[1], x_shape[2]
  return (kernel_size, stride, padding) == (3, 1, 1) and h % _M == 0 and w % _M == 0


# The 2-D transforms as single matrices over the flattened tile: K[(i, j), (a, b)] =
# L[i, a] * L[j, b]. One small dot per transform compiles to a few kernels; unrolled sums of
# strided slices compiled to ~40 fusions per conv and doubled the train step's compile time.
_K_IN = np.kron(_BT, _BT)      # (T*T, T*T)
_K_OUT = np.kron(_AT, _AT)     # (M*M, T*T)


def _mix(k: np.ndarray, t: Array) -> Array:
  """k @ t over the leading (tile) axis, exact in t's dtype (k holds 0, +-1 and +-0.5)."""
  return jnp.einsum("kd,d...->k...", jnp.asarray(k, t.dtype), t,
                    precision=jax.lax.Precision.HIGHEST)


def _phases(x: Array) -> tuple[Array, int, int]:
  """x padded for tiling and split by position modulo m: (B, Ht+1, m, Wt+1, m, C)."""
  b, h, w, c = x.shape
  ht, wt = h // _M, w // _M
  xp = jnp.pad(x, ((0, 0), (1, _M * (ht + 1) - h - 1), (1, _M * (wt + 1) - w - 1), (0, 0)))
  return xp.reshape(b, ht + 1, _M, wt + 1, _M, c), ht, wt


def input_transform(x: Array) -> Array:
  """x (B, H, W, C) -> V (T*T, B*Ht*Wt, C): B^T d B of every overlapping input tile."""
  xs, ht, wt = _phases(x)
  # Tile element a = m*s + r of tile i sits at padded phase row (i + s, r); T = 2m here, s <= 1.
  rows = jnp.stack([xs[:, s:s + ht] for s in range(2)])              # (sa, B, Ht, ra, Wt+1, rb, C)
  both = jnp.stack([rows[:, :, :, :, s:s + wt] for s in range(2)])   # (sb, sa, B, Ht, ra, Wt, rb, C)
  d = both.transpose(1, 4, 0, 6, 2, 3, 5, 7).reshape(_T * _T, -1, x.shape[-1])
  return _mix(_K_IN, d)


def input_transform_t(dv: Array, x_shape: Sequence[int]) -> Array:
  """Transpose of `input_transform`: overlap-adds B dV B^T back onto the input grid."""
  b, h, w, c = x_shape
  ht, wt = h // _M, w // _M
  e = _mix(_K_IN.T, dv).reshape(2, _M, 2, _M, b, ht, wt, c)          # (sa, ra, sb, rb, ...)
  acc = None
  for sa in range(2):
    for sb in range(2):
      part = jnp.pad(e[sa, :, sb], ((0, 0), (0, 0), (0, 0), (sa, 1 - sa), (sb, 1 - sb), (0, 0)))
      acc = part if acc is None else acc + part                       # (ra, rb, B, Ht+1, Wt+1, C)
  full = acc.transpose(2, 3, 0, 4, 1, 5).reshape(b, _M * (ht + 1), _M * (wt + 1), c)
  return full[:, 1:h + 1, 1:w + 1, :]


def output_transform(m: Array, out_shape: Sequence[int]) -> Array:
  """M (T*T, B*Ht*Wt, O) -> y (B, H, W, O): A^T M A of every tile, tiles laid side by side."""
  b, h, w, o = out_shape
  y = _mix(_K_OUT, m).reshape(_M, _M, b, h // _M, w // _M, o)
  return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, o)


def output_transform_t(g: Array) -> Array:
  """Transpose of `output_transform`: g (B, H, W, O) -> dM (T*T, B*Ht*Wt, O)."""
  b, h, w, o = g.shape
  tiles = g.reshape(b, h // _M, _M, w // _M, _M, o).transpose(2, 4, 0, 1, 3, 5)
  return _mix(_K_OUT.T, tiles.reshape(_M * _M, -1, o))


def filter_transform(w: Array) -> Array:
  """w (3, 3, C, O) HWIO -> U (T*T, C, O) = G g G^T per channel pair."""
  g = jnp.asarray(_G, w.dtype)
  return jnp.einsum("ia,abco,jb->ijco", g, w, g).reshape(_T * _T, *w.shape[2:])


def filter_transform_t(du: Array) -> Array:
  """Transpose of `filter_transform`: dU (T*T, C, O) -> dw (3, 3, C, O)."""
  g = jnp.asarray(_G, du.dtype)
  return jnp.einsum("ia,ijco,jb->abco", g, du.reshape(_T, _T, *du.shape[1:]), g)


def _tile_matmul(a: Array, b: Array, spec: str) -> Array:
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(a.dtype)


@jax.custom_vjp
def conv3x3(x: Array, w: Array) -> Array:
  """3x3 stride-1 padding-1 conv, x NHWC, w HWIO, via Winograd F(2, 3)."""
  return _conv3x3_fwd(x, w)[0]


def _conv3x3_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, ...]]:
  v = input_transform(x)
  u = filter_transform(w.astype(x.dtype))
  y = output_transform(_tile_matmul(v, u, "knc,kco->kno"), x.shape[:3] + (w.shape[-1],))
  # V (4x the input) is kept for dU rather than recomputed. The zero-size stand-in carries w's
  # dtype to the backward at no cost.
  return y, (v, u, jnp.zeros((0,), w.dtype))


def _conv3x3_bwd(res: tuple[Array, ...], g: Array) -> tuple[Array, Array]:
  v, u, w_proto = res
  dm = output_transform_t(g.astype(v.dtype))
  dx = input_transform_t(_tile_matmul(dm, u, "kno,kco->knc"), g.shape[:3] + v.shape[-1:])
  du = _tile_matmul(v, dm, "knc,kno->kco")
  return dx, filter_transform_t(du).astype(w_proto.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
