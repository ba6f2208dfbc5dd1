"""GroupNorm with the closed-form backward: values and all three gradients vs autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.models import norm


def _reference(x, scale, bias, groups, eps):
  """Plain two-pass GroupNorm, differentiated by JAX."""
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape,groups", [((3, 4, 4, 32), 32), ((2, 5, 3, 64), 32),
                                          ((4, 16, 12), 4), ((2, 2, 2, 96), 32)])
def test_values_and_gradients_match_autodiff(shape, groups):
  k = jax.random.split(jax.random.key(0), 4)
  x = 3.0 * jax.random.normal(k[0], shape) + 1.5
  scale = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
  bias = 0.1 * jax.random.normal(k[2], shape[-1:])
  probe = jax.random.normal(k[3], shape)   # a non-trivial cotangent

  def loss(f):
    return lambda x, s, b: jnp.sum(probe * jnp.tanh(f(x, s, b)))

  ours = lambda x, s, b: norm.group_norm(x, s, b, groups=groups, eps=1e-5)
  ref = lambda x, s, b: _reference(x, s, b, groups, 1e-5)
  np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), atol=2e-6)
  g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(x, scale, bias)
  for a, r, name in zip(g_ours, g_ref, ("x", "scale", "bias")):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4, err_msg=name)


def test_gradient_under_jit_is_finite():
  x = jnp.ones((2, 4, 4, 32)) * jnp.arange(32.0)
  f = jax.jit(jax.grad(lambda x: jnp.sum(norm.group_norm(x, jnp.ones(32), jnp.zeros(32),
                                                         groups=32, eps=1e-5) ** 3)))
  assert np.all(np.isfinite(f(x)))


def test_bad_group_count_names_the_problem():
  with pytest.raises(ValueError, match="not divisible by 32 groups"):
    norm.group_norm(jnp.ones((1, 2, 2, 48)), jnp.ones(48), jnp.zeros(48), groups=32, eps=1e-5)
