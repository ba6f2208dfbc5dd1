"""Augmentation: every RandAugment op against PIL (the reference's backend), crops, views."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from jdcl_jax.data import augment
from jdcl_jax.data import randaugment as ra


def _images(channels: int, n: int = 3, size: int = 16) -> list:
  rs = np.random.RandomState(channels)
  noisy = [rs.randint(0, 256, (size, size, channels)) for _ in range(n)]
  smooth = [np.clip(rs.normal(110, 25, (size, size, channels)), 0, 255) for _ in range(n)]
  return [x.astype(np.uint8) for x in noisy + smooth]


def _pil(x):
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _pil_op(name: str, img: Image.Image, v: int, sign: int) -> Image.Image:
  """FixMatch's RandAugmentMC op semantics, written against PIL directly."""
  f = v * 0.9 / 10 + 0.05
  w, h = img.size
  ops = {
      "AutoContrast": lambda: ImageOps.autocontrast(img),
      "Brightness": lambda: ImageEnhance.Brightness(img).enhance(f),
      "Color": lambda: ImageEnhance.Color(img).enhance(f),
      "Contrast": lambda: ImageEnhance.Contrast(img).enhance(f),
      "Equalize": lambda: ImageOps.equalize(img),
      "Identity": lambda: img,
      "Posterize": lambda: ImageOps.posterize(img, int(v * 4 / 10) + 4),
      "Rotate": lambda: img.rotate(sign * int(v * 30 / 10)),
      "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(f),
      "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, sign * v * 0.3 / 10, 0, 0, 1, 0)),
      "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * v * 0.3 / 10, 1, 0)),
      "Solarize": lambda: ImageOps.solarize(img, 256 - int(v * 256 / 10)),
      "TranslateX": lambda: img.transform(img.size, Image.AFFINE,
                                          (1, 0, int(sign * v * 0.3 / 10 * w), 0, 1, 0)),
      "TranslateY": lambda: img.transform(img.size, Image.AFFINE,
                                          (1, 0, 0, 0, 1, int(sign * v * 0.3 / 10 * h))),
  }
  return ops[name]()


# Largest fraction of pixels allowed to differ from PIL, and by how much. Exact
# ops are bit-identical; others differ only where float32 and PIL's float64 round
# an exact tie differently (one row for a shear, edge pixels for a rotation).
_TOLERANCE = {"AutoContrast": (0.05, 1), "Color": (0.01, 1), "Contrast": (0.01, 1),
              "Sharpness": (0.01, 1), "Rotate": (0.02, 255), "ShearX": (1 / 16 + 1e-6, 255),
              "ShearY": (1 / 16 + 1e-6, 255)}


@functools.cache
def _apply_op_jit():
  return jax.jit(ra.apply_op)


@pytest.mark.parametrize("name", ra.OP_NAMES)
def test_op_matches_pil(name):
  max_frac, max_diff = _TOLERANCE.get(name, (0.0, 0))
  op = ra.OP_NAMES.index(name)
  for channels in (1, 3):
    for x in _images(channels):
      for v in (1, 4, 9):
        for sign in (1, -1):
          ref = np.asarray(_pil_op(name, _pil(x), v, sign)).reshape(x.shape)
          out = np.asarray(_apply_op_jit()(jnp.asarray(x, jnp.float32), op, v, sign))
          assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
          np.testing.assert_array_equal(out, np.round(out))  # still integer pixels
          diff = np.abs(out - ref)
          assert (diff > 0).mean() <= max_frac and diff.max() <= max_diff, (channels, v, sign)


def test_magnitude_ranges_follow_the_spec():
  v = jnp.arange(1, 10)
  np.testing.assert_allclose(ra.enhance_factor(v), 0.05 + 0.9 * np.arange(1, 10) / 10, rtol=1e-6)
  assert ra.enhance_factor(1) == pytest.approx(0.14) and ra.enhance_factor(9) == pytest.approx(0.86)
  assert ra.posterize_bits(v).tolist() == [4, 4, 5, 5, 6, 6, 6, 7, 7]
  assert ra.rotate_degrees(v).tolist() == [3, 6, 9, 12, 15, 18, 21, 24, 27]
  np.testing.assert_allclose(ra.shear_factor(v), 0.03 * np.arange(1, 10), rtol=1e-6)
  assert ra.solarize_threshold(1) == 231 and ra.solarize_threshold(9) == 26
  assert ra.translate_pixels(v, 32).tolist() == [int(0.03 * i * 32) for i in range(1, 10)]


def test_sampled_ops_cover_the_pool():
  keys = jax.random.split(jax.random.key(0), 4000)
  ops, vs, applied, signs = jax.vmap(lambda k: ra.sample_ops(k, 2, 10))(keys)
  assert set(np.unique(ops).tolist()) == set(range(14))
  assert set(np.unique(vs).tolist()) == set(range(1, 10))
  assert 0.45 < float(applied.mean()) < 0.55 and set(np.unique(signs).tolist()) == {-1, 1}
  assert np.mean(ops[:, 0] == ops[:, 1]) > 0.03  # drawn with replacement
  with pytest.raises(ValueError, match="magnitude"):
    ra.sample_ops(keys[0], 2, 11)


def test_cutout_matches_pil_rectangle():
  rs = np.random.RandomState(0)
  fn = jax.jit(ra.cutout_at, static_argnums=3)
  for _ in range(30):
    x = rs.randint(0, 256, (32, 32, 3)).astype(np.uint8)
    cx, cy, size = rs.uniform(0, 32), rs.uniform(0, 32), 16
    x0, y0 = int(max(0, cx - size / 2)), int(max(0, cy - size / 2))
    ref = _pil(x.copy())
    ImageDraw.Draw(ref).rectangle((x0, y0, int(min(32, x0 + size)), int(min(32, y0 + size))),
                                  (127, 127, 127))
    np.testing.assert_array_equal(fn(jnp.asarray(x, jnp.float32), cx, cy, size), np.asarray(ref))
  # Unclipped, PIL's inclusive rectangle paints (size + 1)^2 pixels.
  out = fn(jnp.zeros((32, 32, 1)), 16.0, 16.0, 16)
  assert int((out == 127).sum()) == 17 * 17


def test_resized_crop_matches_pil():
  rs = np.random.RandomState(1)
  fn = jax.jit(augment.resized_crop)
  for channels in (1, 3, 3, 1, 3):
    x = rs.randint(0, 256, (32, 32, channels)).astype(np.uint8)
    h, w = rs.randint(18, 33, size=2)
    top, left = rs.randint(0, 33 - h), rs.randint(0, 33 - w)
    ref = _pil(x).crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR)
    out = fn(jnp.asarray(x, jnp.float32), top, left, h, w)
    np.testing.assert_array_equal(out, np.asarray(ref).reshape(x.shape))


def test_rrc_box_respects_scale_and_ratio():
  keys = jax.random.split(jax.random.key(1), 2000)
  top, left, h, w = map(np.asarray, jax.vmap(
      lambda k: augment.rrc_box(k, 32, 32, (0.64, 1.0)))(keys))
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
  area = h * w / 1024
  assert area.min() > 0.58 and area.max() <= 1.0  # 0.64 up to rounding of the sides
  assert (w / h).min() > 0.7 and (w / h).max() < 1.43
  assert len(np.unique(top)) > 5 and len(np.unique(w)) > 5


def test_pad_and_crop_is_a_window_of_the_reflect_padded_image():
  x = np.random.RandomState(2).randint(0, 256, (8, 8, 1)).astype(np.float32)
  padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="reflect")
  windows = {(i, j) for i in range(9) for j in range(9)}
  seen = set()
  for k in jax.random.split(jax.random.key(3), 200):
    out = np.asarray(augment.pad_and_crop(k, jnp.asarray(x), 4))
    match = [(i, j) for i, j in windows if np.array_equal(out, padded[i:i + 8, j:j + 8])]
    assert match
    seen.update(match)
  assert len(seen) > 40  # offsets 0..8 in both directions are all reachable


# ---- batched views ------------------------------------------------------------------------------

def _batch(channels, size, n=6):
  x = np.random.RandomState(5).randint(0, 256, (n, size, size, channels)).astype(np.uint8)
  x[1] = x[0]  # identical images must still get different augmentations
  return jnp.asarray(x)


_VIEWS = {
    "diffusion": augment.diffusion_view,
    "classifier": functools.partial(augment.classifier_view, cutout=4),  # 16 px would hide 8x8
    "weak": augment.weak_view,
    "strong": functools.partial(augment.strong_view, cutout=4),
}


@pytest.mark.parametrize("name", list(_VIEWS))
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 16)])
def test_view_shape_range_and_keys(name, channels, size):
  x = _batch(channels, size)
  view = _VIEWS[name]
  a = view(jax.random.key(0), x)
  assert a.shape == x.shape and a.dtype == jnp.float32
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, view(jax.random.key(0), x))
  assert not np.array_equal(a, view(jax.random.key(1), x))
  assert not np.array_equal(a[0], a[1])  # per-example keys


def test_all_switches_off_is_plain_normalization():
  x = _batch(1, 8)
  expected = np.asarray(x, np.float32) / 127.5 - 1
  off = augment.classifier_view(jax.random.key(0), x, randaugment=False, cutout=0, flip=False, pad=0)
  np.testing.assert_allclose(off, expected, atol=1e-6)
  np.testing.assert_allclose(augment.diffusion_view(jax.random.key(0), x, scale=None, flip=False),
                             expected, atol=1e-6)


def test_flip_only_flips():
  x = _batch(3, 16, n=32)
  out = np.asarray(augment.diffusion_view(jax.random.key(4), x, scale=None, flip=True))
  ref = np.asarray(x, np.float32) / 127.5 - 1
  flipped = np.array([np.allclose(o, r[:, ::-1], atol=1e-6) for o, r in zip(out, ref)])
  same = np.array([np.allclose(o, r, atol=1e-6) for o, r in zip(out, ref)])
  assert (flipped | same).all() and 5 < flipped.sum() < 27


def test_views_from_config_uses_the_stage_schema():
  diff = ml_collections.ConfigDict(dict(flip=False, rrc_scale=None))
  cls = ml_collections.ConfigDict(dict(flip=False, crop_pad=0, randaugment=False, cutout=0))
  views = augment.views_from_config(diff, cls)
  x = _batch(1, 8)
  expected = np.asarray(x, np.float32) / 127.5 - 1
  for name in ("diffusion", "classifier", "weak", "eval"):
    np.testing.assert_allclose(views[name](jax.random.key(0), x), expected, atol=1e-6)
  strong = views["strong"](jax.random.key(0), x)  # RandAugment is always on in the strong view
  assert strong.shape == x.shape and not np.allclose(strong, expected)


def test_views_work_under_an_outer_jit():
  x = _batch(3, 16)
  fn = jax.jit(lambda k, imgs: augment.classifier_view(k, imgs, cutout=8))
  np.testing.assert_array_equal(fn(jax.random.key(2), x),
                                augment.classifier_view(jax.random.key(2), x, cutout=8))
