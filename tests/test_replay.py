"""Replay quotas: exact per-class counts, labels by the generator, termination when a class never
appears (the original loops forever there, spec 8.1.5)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdcl_jax.cl import replay


def _cfg(fill="repeat", factor=2.0):
  return ml_collections.ConfigDict(dict(max_generated_factor=factor, fill=fill))


def _fake_generator(label_probs, batch=16, size=4, num_classes=5):
  """Images whose pixel value encodes the sample index; labels drawn from `label_probs`."""
  calls = {"n": 0}

  def gen(sample_params, label_params, rng):
    calls["n"] += 1
    k1, k2 = jax.random.split(rng)
    labels = jax.random.choice(k1, num_classes, (batch,), p=jnp.asarray(label_probs))
    logits = jax.nn.one_hot(labels, num_classes) * 5.0 + jax.random.normal(k2, (batch, num_classes))
    imgs = jnp.broadcast_to(labels[:, None, None, None].astype(jnp.uint8), (batch, size, size, 1))
    return imgs, logits
  return gen, calls


def test_exact_quota_and_labels_from_generator():
  gen, _ = _fake_generator([0.5, 0.5, 0.0, 0.0, 0.0])
  x, y, stats = replay.generate_class_set(gen, None, None, [0, 1], 10, jax.random.key(0), _cfg(),
                                          (0.9, 1.0))
  assert x.shape == (20, 4, 4, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y), [10, 10])
  # every kept image carries its class (pixel value = generator label)
  np.testing.assert_array_equal(x[:, 0, 0, 0], y)
  assert stats["kept"] == {0: 10, 1: 10} and stats["filled"] == {0: 0, 1: 0}


def test_class_never_generated_terminates_with_best_ranked_fill():
  # class 1 is never the argmax: the original's fill loop would never end
  gen, calls = _fake_generator([0.5, 0.0, 0.5, 0.0, 0.0])
  x, y, stats = replay.generate_class_set(gen, None, None, [0, 1], 10, jax.random.key(1),
                                          _cfg(factor=2.0), (0.9, 1.0))
  assert calls["n"] == 3                         # cap 2 * 10 * 2 = 40 images -> 3 batches of 16
  assert stats["cap_reached"] and stats["kept"][1] == 0 and stats["filled"][1] == 10
  np.testing.assert_array_equal(np.bincount(y, minlength=2), [10, 10])


def test_deficit_filled_by_augmented_copies():
  gen, _ = _fake_generator([0.9, 0.1, 0.0, 0.0, 0.0], batch=8)
  x, y, stats = replay.generate_class_set(gen, None, None, [0, 1], 8, jax.random.key(2),
                                          _cfg(fill="augment", factor=1.0), (0.9, 1.0))
  assert stats["filled"][1] > 0 and len(y) == 16
  assert x.dtype == np.uint8
