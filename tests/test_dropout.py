"""The fused dropout masks equal jax.random's, bit for bit (models/dropout.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.models import dropout


def _reference(key, index, shape, p_keep):
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(index))
  return jax.vmap(lambda k: jax.random.bernoulli(k, p_keep, shape))(keys)


@pytest.mark.parametrize("shape,p_keep,first", [((8, 8, 64), 0.9, 0), ((4, 4, 3), 0.75, 37),
                                                ((256,), 0.5, 5), ((3, 5), 0.999, 2 ** 31 - 6)])
def test_masks_equal_jax_random_bernoulli(shape, p_keep, first):
  key = jax.random.key(11)
  index = first + jnp.arange(6)
  ours = jax.jit(dropout.example_keep_masks, static_argnums=(2, 3))(key, index, shape, p_keep)
  np.testing.assert_array_equal(ours, _reference(key, index, shape, p_keep))
  assert ours.dtype == jnp.bool_ and ours.shape == (6,) + shape


def test_masks_follow_arbitrary_example_ids():
  """A gathered subset of rows (the KD teachers' subsets) gets each row's own mask."""
  key, ids = jax.random.key(2), jnp.array([9, 2, 40, 3])
  np.testing.assert_array_equal(dropout.example_keep_masks(key, ids, (4, 4, 8), 0.9),
                                _reference(key, ids, (4, 4, 8), 0.9))


def test_block_function_is_threefry():
  """fold_in is threefry2x32 of the counter pair (0, i) under the key."""
  key = jax.random.key(3)
  k1, k2 = jax.random.key_data(key)
  o1, o2 = dropout.threefry2x32(k1, k2, jnp.uint32(0), jnp.uint32(9))
  np.testing.assert_array_equal(jnp.stack([o1, o2]),
                                jax.random.key_data(jax.random.fold_in(key, 9)))


def test_other_prng_impls_take_the_plain_path():
  key = jax.random.key(4, impl="rbg")
  np.testing.assert_array_equal(dropout.example_keep_masks(key, jnp.arange(3), (5, 5), 0.8),
                                _reference(key, jnp.arange(3), (5, 5), 0.8))


def test_threshold_matches_uniform_compare():
  """(bits >> 9) < ceil(p 2^23) is exactly uniform(bits) < p, at the edges too."""
  for p in (0.9, 0.75, 0.1, 1.0 - 1e-7, 0.5):
    thr = int(dropout._keep_threshold(p))
    for m in (thr - 1, thr):
      u = np.float32(m) / np.float32(2 ** 23)
      assert (u < np.float32(p)) == (m < thr)
