"""RandAugmentMC (FixMatch variant, spec 5.3) and Cutout, one image at a time.

Images are H x W x C float32 *pixel values* in [0, 255] (C = 1 or 3). The
reference applies these ops with PIL to uint8 images, so each op re-quantizes
its output the way PIL does (truncating blends, rounded luma, integer LUTs);
tests/test_data_augment.py checks every op against PIL itself. Photometric
ops are hand-written where dm_pix's semantics differ from PIL's (noted per
op); geometric ops use dm_pix.affine_transform.
"""
from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

OP_NAMES = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize",
            "Identity", "Posterize", "Rotate", "Sharpness", "ShearX", "ShearY",
            "Solarize", "TranslateX", "TranslateY")
NUM_OPS = len(OP_NAMES)
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
CUTOUT_FILL = 127.0


# ----------------------------------------------------------------------------
# Magnitudes: v in {1..9}; RandAugmentMC scales v/10 of each op's maximum.
# Float magnitudes are looked up in tables built in float64 (as the reference's
# Python computes them) so XLA's float32 reassociation cannot move a factor by
# an ulp and flip PIL's truncation at exact integers.

_V = np.arange(10)
_ENHANCE = np.asarray(_V * 0.9 / 10 + 0.05, np.float32)
_SHEAR = np.asarray(_V * 0.3 / 10, np.float32)


def enhance_factor(v: Array) -> Array:
  """Brightness / Color / Contrast / Sharpness factor: 0.05 + 0.9 v/10."""
  return jnp.asarray(_ENHANCE)[v]


def posterize_bits(v: Array) -> Array:
  """Bits kept: 4 + int(4 v/10), i.e. 4..7."""
  return 4 + (4 * v) // 10


def rotate_degrees(v: Array) -> Array:
  """Unsigned rotation: int(30 v/10) degrees, i.e. 3..27."""
  return (30 * v) // 10


def shear_factor(v: Array) -> Array:
  """Unsigned shear: 0.3 v/10."""
  return jnp.asarray(_SHEAR)[v]


def solarize_threshold(v: Array) -> Array:
  """Pixels >= 256 - int(256 v/10) are inverted."""
  return 256 - (256 * v) // 10


def translate_pixels(v: Array, size: int) -> Array:
  """Unsigned shift int(0.3 v/10 * size) pixels (integer math, no float ties)."""
  return (3 * v * size) // 100


# ----------------------------------------------------------------------------
# Photometric ops on one H x W x C image of float32 pixel values.

def _blend(degenerate: Array, img: Array, factor: Array) -> Array:
  # PIL Image.blend: in1 + a * (in2 - in1), truncated to uint8 and clipped.
  return jnp.clip(jnp.floor(degenerate + factor * (img - degenerate)), 0, 255)


def _luma(img: Array) -> Array:
  """PIL's "L" conversion (ITU-R 601 in 16-bit fixed point, rounded)."""
  if img.shape[-1] == 1:
    return img[..., 0]
  # Not dm_pix.rgb_to_grayscale: its 0.2989 weights miss PIL's rounding.
  rgb = img.astype(jnp.int32)
  y = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768
  return (y >> 16).astype(img.dtype)


def autocontrast(img: Array) -> Array:
  """Per channel, stretch [min, max] to [0, 255] (PIL cutoff=0)."""
  lo = jnp.min(img, axis=(0, 1), keepdims=True)
  hi = jnp.max(img, axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  out = jnp.clip(jnp.floor(img * scale - lo * scale), 0, 255)
  return jnp.where(hi > lo, out, img)


def brightness(img: Array, factor: Array) -> Array:
  # PIL's Brightness blends with black (multiplicative); dm_pix's is additive.
  return _blend(jnp.zeros_like(img), img, factor)


def color(img: Array, factor: Array) -> Array:
  """Blend with the grayscale image; the identity for 1 channel (as PIL)."""
  return _blend(jnp.broadcast_to(_luma(img)[..., None], img.shape), img, factor)


def contrast(img: Array, factor: Array) -> Array:
  # PIL blends with the rounded mean *luma* (one scalar); dm_pix's
  # adjust_contrast uses per-channel means (tf.image semantics).
  mean = jnp.floor(jnp.mean(_luma(img)) + 0.5)
  return _blend(jnp.full_like(img, mean), img, factor)


def _equalize_channel(x: Array) -> Array:
  xi = x.astype(jnp.int32)
  hist = jnp.zeros(256, jnp.int32).at[xi.ravel()].add(1)
  step = (xi.size - hist[jnp.max(xi)]) // 255
  lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
  out = jnp.minimum(lut, 255)[xi].astype(x.dtype)
  # PIL leaves single-valued channels and step == 0 unchanged.
  return jnp.where((jnp.sum(hist > 0) > 1) & (step > 0), out, x)


def equalize(img: Array) -> Array:
  """PIL ImageOps.equalize, per channel."""
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(img)


def posterize(img: Array, bits: Array) -> Array:
  shift = 8 - bits
  return ((img.astype(jnp.int32) >> shift) << shift).astype(img.dtype)


def sharpness(img: Array, factor: Array) -> Array:
  """Blend with PIL's SMOOTH filter (3x3, centre 5, /13; border kept)."""
  h, w = img.shape[:2]
  padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
  win = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  smooth = jnp.floor((win + 4.0 * img) / 13.0 + 0.5)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  # A mask rather than .at[1:-1, 1:-1].set: measured ~25% faster on CPU.
  return _blend(jnp.where(border, img, smooth), img, factor)


def solarize(img: Array, threshold: Array) -> Array:
  return jnp.round(dm_pix.solarize(img / 255.0, threshold / 255.0) * 255.0)


# ----------------------------------------------------------------------------
# Geometric ops: PIL's Image.transform(AFFINE, NEAREST, fill 0) through dm_pix.

def _pil_affine(img: Array, coeffs: Array) -> Array:
  """Pull-resamples with PIL coefficients (a, b, c, d, e, f).

  PIL reads input (x, y) = (a x + b y + c, d x + e y + f) at output pixel
  centres (col + .5, row + .5) and takes floor(); in dm_pix index space
  (pixel centres at integers, rounding) that is this matrix and offset.
  dm_pix evaluates M @ index + offset in float32, so where PIL's float64
  lands exactly on a pixel edge (e.g. ShearX v=4, row 12 of 32) a row can
  sample one pixel over from PIL; elsewhere the result is identical.
  """
  a, b, c, d, e, f = coeffs
  matrix = jnp.array([[e, d, 0.0], [b, a, 0.0], [0.0, 0.0, 1.0]])
  offset = jnp.stack([0.5 * (d + e) + f - 0.5, 0.5 * (a + b) + c - 0.5, 0.0])
  return dm_pix.affine_transform(img, matrix, offset=offset, order=0,
                                 mode="constant", cval=0.0)


def _affine_coeffs(op: Array, v: Array, sign: Array, h: int, w: int) -> Array:
  """PIL coefficients of op (identity for photometric ops), signed by sign."""
  theta = -jnp.deg2rad(sign * rotate_degrees(v))  # PIL rotates counter-clockwise
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = w / 2.0, h / 2.0
  rot = jnp.stack([cos, sin, cx - cos * cx - sin * cy,
                   -sin, cos, cy + sin * cx - cos * cy])
  s = sign * shear_factor(v)
  tx = (sign * translate_pixels(v, w)).astype(jnp.float32)
  ty = (sign * translate_pixels(v, h)).astype(jnp.float32)
  one, zero = jnp.ones(()), jnp.zeros(())
  table = {
      "Rotate": rot,
      "ShearX": jnp.stack([one, s, zero, zero, one, zero]),
      "ShearY": jnp.stack([one, zero, zero, s, one, zero]),
      "TranslateX": jnp.stack([one, zero, tx, zero, one, zero]),
      "TranslateY": jnp.stack([one, zero, zero, zero, one, ty]),
  }
  identity = jnp.stack([one, zero, zero, zero, one, zero])
  rows = jnp.stack([table.get(name, identity) for name in OP_NAMES])
  return rows[op]


def apply_op(img: Array, op: Array, v: Array, sign: Array) -> Array:
  """Applies RandAugment op index `op` (see OP_NAMES) with magnitude v.

  Args:
    img: H x W x C float32 pixel values in [0, 255] (integer-valued).
    op: int32 index into OP_NAMES.
    v: int32 magnitude in 1..9.
    sign: +1 or -1, used by Rotate, Shear* and Translate*.
  """
  op, v, sign = (jnp.asarray(a, jnp.int32) for a in (op, v, sign))
  f = enhance_factor(v)
  photometric = {
      "AutoContrast": autocontrast, "Equalize": equalize,
      "Identity": lambda x: x,
      "Brightness": lambda x: brightness(x, f), "Color": lambda x: color(x, f),
      "Contrast": lambda x: contrast(x, f), "Sharpness": lambda x: sharpness(x, f),
      "Posterize": lambda x: posterize(x, posterize_bits(v)),
      "Solarize": lambda x: solarize(x, solarize_threshold(v)),
  }
  # All geometric ops share one gather (their matrix is picked by index), so
  # under vmap, where lax.switch evaluates every branch, we pay one resample.
  branches = [photometric.get(name, lambda x: x) for name in OP_NAMES]
  out = jax.lax.switch(op, branches, img)
  geo = jnp.isin(op, jnp.array([OP_NAMES.index(n) for n in _GEOMETRIC]))
  warped = _pil_affine(img, _affine_coeffs(op, v, sign, *img.shape[:2]))
  return jnp.where(geo, warped, out)


def sample_ops(key: Array, num_ops: int = 2, magnitude: int = 10) -> tuple[Array, ...]:
  """RandAugmentMC draws: (op, v, applied, sign), each of length num_ops.

  Ops with replacement from all 14; v ~ U{1..magnitude-1} (numpy's
  randint(1, m)); each op applied with probability 0.5; a random sign for the
  signed ops (Rotate, Shear*, Translate*).
  """
  if not 2 <= magnitude <= 10:
    raise ValueError(f"magnitude must be in 2..10 (v < magnitude), got {magnitude}")
  k_op, k_v, k_apply, k_sign = jax.random.split(key, 4)
  ops = jax.random.randint(k_op, (num_ops,), 0, NUM_OPS)
  vs = jax.random.randint(k_v, (num_ops,), 1, magnitude)
  applied = jax.random.bernoulli(k_apply, 0.5, (num_ops,))
  signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (num_ops,)), -1, 1)
  return ops, vs, applied, signs


def randaugment_mc(key: Array, img: Array, num_ops: int = 2,
                   magnitude: int = 10) -> Array:
  """RandAugmentMC(num_ops, magnitude) without its Cutout (see random_cutout)."""
  ops, vs, applied, signs = sample_ops(key, num_ops, magnitude)
  for i in range(num_ops):
    img = jnp.where(applied[i], apply_op(img, ops[i], vs[i], signs[i]), img)
  return img


def cutout_at(img: Array, x_centre: Array, y_centre: Array, size: int) -> Array:
  """Gray square as FixMatch's CutoutAbs draws it with PIL.

  The corner is int(max(0, centre - size/2)) and the far corner
  int(min(W, x0 + size)); PIL's rectangle includes both corners, so an
  unclipped box is size + 1 pixels wide (17 for 16), as in the reference.
  """
  h, w = img.shape[:2]
  x0 = jnp.floor(jnp.maximum(0.0, x_centre - size / 2.0))
  y0 = jnp.floor(jnp.maximum(0.0, y_centre - size / 2.0))
  x1, y1 = jnp.minimum(w, x0 + size), jnp.minimum(h, y0 + size)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  inside = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
  return jnp.where(inside, CUTOUT_FILL, img)


def random_cutout(key: Array, img: Array, size: int) -> Array:
  h, w = img.shape[:2]
  kx, ky = jax.random.split(key)
  return cutout_at(img, jax.random.uniform(kx, (), maxval=w),
                   jax.random.uniform(ky, (), maxval=h), size)
