"""Jittable two-view augmentation (spec 5.3) and FixMatch weak/strong views.

Public view functions take a key and a uint8 B x H x W x C batch (C = 1 or 3)
and return float32 in [-1, 1] (mean = std = 0.5). Each example gets its own
key (vmap over split keys), so a batch is a pure function of (key, images).

The reference runs torchvision/PIL transforms on uint8 PIL images. To stay
close to it, per-image code works on float32 *pixel values* in [0, 255] and
re-quantizes after every op as PIL would (ops such as Posterize, Equalize and
Solarize are defined on integer pixels); rounding follows PIL where it matters.

  diffusion view : flip(p=0.5) -> RandomResizedCrop(scale, ratio 3/4..4/3)
  classifier view: flip -> reflect-pad-4 random crop -> RandAugmentMC(2, 10)
                   -> Cutout(16, gray 127)
  weak view      : flip -> pad-crop;   strong view: weak + RandAugmentMC + Cutout
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

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
  win = sum(img[dy:dy + h - 2, dx:dx + w - 2] for dy in range(3) for dx in range(3))
  smooth = jnp.floor((win + 4.0 * img[1:-1, 1:-1]) / 13.0 + 0.5)
  return _blend(img.at[1:-1, 1:-1].set(smooth), img, factor)


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


def randaugment_mc(key: Array, img: Array, num_ops: int = 2,
                   magnitude: int = 10) -> Array:
  """RandAugmentMC: num_ops ops drawn with replacement, v ~ U{1..magnitude-1},
  each applied with probability 0.5 (FixMatch variant; Cutout is separate)."""
  k_op, k_v, k_apply, k_sign = jax.random.split(key, 4)
  ops = jax.random.randint(k_op, (num_ops,), 0, NUM_OPS)
  vs = jax.random.randint(k_v, (num_ops,), 1, magnitude)
  applied = jax.random.bernoulli(k_apply, 0.5, (num_ops,))
  signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (num_ops,)), -1, 1)
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


# ----------------------------------------------------------------------------
# Crops.

def pad_and_crop(key: Array, img: Array, pad: int) -> Array:
  """torchvision RandomCrop(size, padding=pad, padding_mode="reflect")."""
  padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  return dm_pix.random_crop(key, padded, img.shape)


def _resize_weights(start: Array, length: Array, in_size: int, out_size: int) -> Array:
  """out_size x in_size PIL BILINEAR weights resizing [start, start+length).

  PIL antialiases: the triangle is widened by the downscale factor. Pixels
  outside the crop get zero weight, as when torchvision crops then resizes.
  """
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size) + 0.5) * scale
  pix = jnp.arange(in_size) + 0.5
  wts = jnp.maximum(0.0, 1.0 - jnp.abs(pix[None, :] - centre[:, None]) / support)
  inside = (pix >= start) & (pix < start + length)
  wts = jnp.where(inside[None, :], wts, 0.0)
  return wts / jnp.sum(wts, axis=1, keepdims=True)


def resized_crop(img: Array, top: Array, left: Array, height: Array, width: Array) -> Array:
  """Crops a (traced) box and resizes it back to the input size (PIL bilinear)."""
  h, w = img.shape[:2]
  wy = _resize_weights(top, height, h, h)
  wx = _resize_weights(left, width, w, w)
  # PIL resamples horizontally, rounds to uint8, then vertically.
  rows = jnp.floor(jnp.einsum("hwc,pw->hpc", img, wx, precision="highest") + 0.5)
  out = jnp.einsum("oh,hpc->opc", wy, rows, precision="highest")
  return jnp.clip(jnp.floor(out + 0.5), 0, 255)


def rrc_box(key: Array, h: int, w: int, scale: Sequence[float],
            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[Array, ...]:
  """torchvision RandomResizedCrop.get_params: 10 tries, then a centre crop."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(k_area, (10,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (10,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  cw = jnp.round(jnp.sqrt(area * jnp.exp(log_r))).astype(jnp.int32)
  ch = jnp.round(jnp.sqrt(area / jnp.exp(log_r))).astype(jnp.int32)
  ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  tops = jax.random.randint(k_top, (10,), 0, jnp.maximum(h - ch + 1, 1))
  lefts = jax.random.randint(k_left, (10,), 0, jnp.maximum(w - cw + 1, 1))
  # Fallback (static shapes): the whole image clamped to the ratio range.
  fw, fh = w, h
  if w / h < ratio[0]:
    fh = int(round(w / ratio[0]))
  elif w / h > ratio[1]:
    fw = int(round(h * ratio[1]))
  first = jnp.argmax(ok)
  pick = lambda tries, fallback: jnp.where(ok.any(), tries[first], fallback)
  return (pick(tops, (h - fh) // 2), pick(lefts, (w - fw) // 2),
          pick(ch, fh), pick(cw, fw))


def random_resized_crop(key: Array, img: Array, scale: Sequence[float],
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Array:
  box = rrc_box(key, img.shape[0], img.shape[1], scale, ratio)
  return resized_crop(img, *(b.astype(jnp.float32) for b in box))


def _random_flip(key: Array, img: Array) -> Array:
  return dm_pix.random_flip_left_right(key, img, probability=0.5)


# ----------------------------------------------------------------------------
# Batched views.

def normalize(x_uint8: Array) -> Array:
  """uint8 (or pixel-valued float) -> float32 in [-1, 1] (mean = std = 0.5)."""
  return jnp.asarray(x_uint8, jnp.float32) / 127.5 - 1.0


def _per_example(fn: Callable[[Array, Array], Array], rng: Array, x: Array) -> Array:
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"expected B x H x W x C (C = 1 or 3), got {x.shape}")
  keys = jax.random.split(rng, x.shape[0])
  return normalize(jax.vmap(fn)(keys, x.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("scale", "ratio", "flip"))
def _diffusion_view(rng, x, *, scale, ratio, flip):
  def one(key, img):
    k_flip, k_crop = jax.random.split(key)
    if flip:
      img = _random_flip(k_flip, img)
    if scale is not None:
      img = random_resized_crop(k_crop, img, scale, ratio)
    return img
  return _per_example(one, rng, x)


@functools.partial(jax.jit, static_argnames=(
    "randaugment", "cutout", "flip", "pad", "num_ops", "magnitude"))
def _classifier_view(rng, x, *, randaugment, cutout, flip, pad, num_ops, magnitude):
  def one(key, img):
    k_flip, k_crop, k_ra, k_cut = jax.random.split(key, 4)
    if flip:
      img = _random_flip(k_flip, img)
    if pad:
      img = pad_and_crop(k_crop, img, pad)
    if randaugment:
      img = randaugment_mc(k_ra, img, num_ops, magnitude)
    if cutout:
      img = random_cutout(k_cut, img, cutout)
    return img
  return _per_example(one, rng, x)


def _tuple(x: Optional[Sequence[float]]) -> Optional[tuple[float, ...]]:
  return None if x is None else tuple(float(v) for v in x)  # hashable for jit


def diffusion_view(rng: Array, x_uint8_BHWC: Array, *,
                   scale: Optional[Sequence[float]] = (0.85, 1.0),
                   ratio: Sequence[float] = (3 / 4, 4 / 3),
                   flip: bool = True) -> Array:
  """Diffusion input: flip + RandomResizedCrop (scale=None: no crop)."""
  return _diffusion_view(rng, x_uint8_BHWC, scale=_tuple(scale),
                         ratio=_tuple(ratio), flip=bool(flip))


def classifier_view(rng: Array, x_uint8_BHWC: Array, *, randaugment: bool = True,
                    cutout: int = 16, flip: bool = True, pad: int = 4,
                    num_ops: int = 2, magnitude: int = 10) -> Array:
  """Classifier input: flip + pad-crop + RandAugmentMC + Cutout (0: off)."""
  return _classifier_view(rng, x_uint8_BHWC, randaugment=bool(randaugment),
                          cutout=int(cutout), flip=bool(flip), pad=int(pad),
                          num_ops=int(num_ops), magnitude=int(magnitude))


def weak_view(rng: Array, x_uint8_BHWC: Array, *, flip: bool = True, pad: int = 4) -> Array:
  """FixMatch weak view: flip + pad-crop."""
  return classifier_view(rng, x_uint8_BHWC, randaugment=False, cutout=0,
                         flip=flip, pad=pad)


def strong_view(rng: Array, x_uint8_BHWC: Array, *, flip: bool = True, pad: int = 4,
                cutout: int = 16, num_ops: int = 2, magnitude: int = 10) -> Array:
  """FixMatch strong view: weak + RandAugmentMC + Cutout."""
  return classifier_view(rng, x_uint8_BHWC, randaugment=True, cutout=cutout,
                         flip=flip, pad=pad, num_ops=num_ops, magnitude=magnitude)


def views_from_config(aug: Any) -> dict[str, Callable[[Array, Array], Array]]:
  """Binds `config.data.augment` knobs; returns diffusion/classifier/weak/strong.

  Fields: flip (bool), rrc_scale (pair or None), pad (int, 0 = off),
  randaugment (bool), num_ops, magnitude, cutout (int, 0 = off).
  """
  get = lambda k, d: d if aug.get(k, None) is None else aug.get(k)
  flip, pad, cutout_size = bool(get("flip", True)), int(get("pad", 4)), int(get("cutout", 16))
  ra = dict(num_ops=int(get("num_ops", 2)), magnitude=int(get("magnitude", 10)))
  scale = get("rrc_scale", (0.85, 1.0))
  return {
      "diffusion": functools.partial(diffusion_view, scale=scale, flip=flip),
      "classifier": functools.partial(
          classifier_view, randaugment=bool(get("randaugment", True)),
          cutout=cutout_size, flip=flip, pad=pad, **ra),
      "weak": functools.partial(weak_view, flip=flip, pad=pad),
      "strong": functools.partial(strong_view, flip=flip, pad=pad,
                                  cutout=cutout_size, **ra),
      "eval": lambda rng, x: normalize(x),
  }
