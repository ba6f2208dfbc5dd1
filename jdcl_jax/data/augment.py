"""Jittable two-view augmentation (spec 5.3) and FixMatch weak/strong views.

Public view functions take a key and a uint8 B x H x W x C batch (C = 1 or 3)
and return float32 in [-1, 1] (mean = std = 0.5). Each example gets its own
key (vmap over split keys), so a batch is a pure function of (key, images).

The reference runs torchvision/PIL transforms on uint8 PIL images. To stay
close to it, per-image code works on float32 *pixel values* in [0, 255] and
re-quantizes after every op as PIL would (ops such as Posterize, Equalize and
Solarize are defined on integer pixels); rounding follows PIL where it matters.
RandAugmentMC and Cutout live in randaugment.py.

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

from jdcl_jax.data.randaugment import randaugment_mc, random_cutout

Array = jax.Array


# ----------------------------------------------------------------------------
# Crops (per image, float32 pixel values).

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
  # XLA turns /127.5 into a reciprocal multiply, so 255 can land 1 ulp above
  # 1.0; the clip keeps the documented range exact.
  return jnp.clip(jnp.asarray(x_uint8, jnp.float32) / 127.5 - 1.0, -1.0, 1.0)


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


def views_from_config(diffusion_cfg: Any, classifier_cfg: Any
                      ) -> dict[str, Callable[[Array, Array], Array]]:
  """Binds a stage's `diffusion_view` / `classifier_view` config blocks.

  diffusion_cfg: flip, rrc_scale (None disables the crop).
  classifier_cfg: flip, crop_pad (0 disables), randaugment, cutout (0
  disables), optional num_ops (2) and magnitude (10). Returns f(rng, x_uint8)
  for "diffusion", "classifier", "weak", "strong" (FixMatch) and "eval".
  """
  c = lambda key, default: classifier_cfg.get(key, default)
  cls = dict(flip=bool(c("flip", True)), pad=int(c("crop_pad", 4)))
  ra = dict(cutout=int(c("cutout", 16)), num_ops=int(c("num_ops", 2)),
            magnitude=int(c("magnitude", 10)))
  return {
      "diffusion": functools.partial(
          diffusion_view, scale=diffusion_cfg.get("rrc_scale", (0.85, 1.0)),
          flip=bool(diffusion_cfg.get("flip", True))),
      "classifier": functools.partial(
          classifier_view, randaugment=bool(c("randaugment", True)), **cls, **ra),
      "weak": functools.partial(weak_view, **cls),
      "strong": functools.partial(strong_view, **cls, **ra),
      "eval": lambda rng, x: normalize(x),
  }
