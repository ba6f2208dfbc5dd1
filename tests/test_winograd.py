"""Winograd F(2, 3) convs (conv_impl="winograd", opt-in on CPU) must equal lax.conv_general_dilated.

Forward, input gradient and weight gradient at square / non-square sizes, 1 and 3 input
channels, batch 1 and >1; the hand-written transposes against JAX's own; the fallback to XLA
for shapes Winograd does not take; bf16; under vmap (inside shard_map: tests/test_conv.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.models import conv, winograd

RTOL = 1e-5  # relative to the largest magnitude of the reference


def _inputs(shape, c_out, seed=0, dtype=jnp.float32):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, shape, dtype)
  w = jax.random.normal(kw, (3, 3, shape[-1], c_out), dtype)
  g = jax.random.normal(kg, shape[:3] + (c_out,), dtype)
  return x, w, g


def _fwd_and_grads(impl):
  def run(x, w, g):
    y, vjp = jax.vjp(lambda a, b: conv.conv2d(a, b, stride=1, padding=1, impl=impl), x, w)
    return (y,) + vjp(g)
  return run


def _assert_close(got, want, rtol=RTOL):
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=rtol * scale, err_msg=name)


# (batch, height, width, c_in): the smallest tile grid, non-square, 1/3 channels, batch 1/>1.
SHAPES = [(1, 2, 2, 1), (3, 4, 6, 3), (2, 8, 8, 1), (1, 16, 16, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}w{}c{}".format(*s))
def test_winograd_matches_xla(shape):
  x, w, g = _inputs(shape, c_out=5)
  want = jax.jit(_fwd_and_grads("xla"))(x, w, g)
  got = jax.jit(_fwd_and_grads("winograd"))(x, w, g)
  _assert_close(got, want)
  # Forward and both gradients are Winograd GEMMs: no XLA conv anywhere.
  assert "conv_general_dilated" not in str(jax.make_jaxpr(_fwd_and_grads("winograd"))(x, w, g))


def test_transposes_are_exact():
  """The hand-written backward transforms equal JAX's transposes of the forward ones."""
  x, w, g = _inputs((2, 4, 6, 3), c_out=5, seed=1)
  v = winograd.input_transform(x)
  dv = jax.random.normal(jax.random.key(2), v.shape)
  (want,) = jax.linear_transpose(winograd.input_transform, x)(dv)
  np.testing.assert_allclose(winograd.input_transform_t(dv, x.shape), want, atol=1e-5)
  dm = winograd.output_transform_t(g)
  (want,) = jax.linear_transpose(lambda m: winograd.output_transform(m, g.shape), dm)(g)
  np.testing.assert_allclose(dm, want, atol=1e-5)
  u = winograd.filter_transform(w)
  (want,) = jax.linear_transpose(winograd.filter_transform, w)(u)
  np.testing.assert_allclose(winograd.filter_transform_t(u), want, atol=1e-5)


@pytest.mark.parametrize("kind", [(7, 1, 1), (8, 2, 1), (8, 1, 0)],
                         ids=["odd-size", "stride2", "pad0"])
def test_unsupported_shapes_fall_back_to_xla(kind):
  size, stride, padding = kind
  x, w, _ = _inputs((2, size, size, 3), c_out=4)
  assert not winograd.supported(x.shape, 3, stride, padding)
  f = lambda a, b: conv.conv2d(a, b, stride=stride, padding=padding, impl="winograd")
  assert "custom_vjp" not in str(jax.make_jaxpr(f)(x, w))
  np.testing.assert_allclose(f(x, w), conv.conv2d(x, w, stride=stride, padding=padding),
                             atol=1e-6)


def test_bf16_inputs():
  x, w, g = _inputs((2, 8, 8, 3), c_out=4)
  bf = [a.astype(jnp.bfloat16) for a in (x, w, g)]
  got = jax.jit(_fwd_and_grads("winograd"))(*bf)
  want = _fwd_and_grads("xla")(*[a.astype(jnp.float32) for a in bf])
  assert all(a.dtype == jnp.bfloat16 for a in got)
  _assert_close([a.astype(jnp.float32) for a in got], want, rtol=2e-2)


def test_vmap_of_grad():
  """Per-example gradients (vmap over grad) match XLA's convs. Gradients inside shard_map are
  checked with the other custom VJPs in tests/test_conv.py."""
  x, w, _ = _inputs((4, 8, 8, 3), c_out=4)
  xs = jnp.stack([x, 2.0 * x])

  def vmapped_grad(impl):
    loss = lambda xx, ww: jnp.sum(jnp.sin(conv.conv2d(xx, ww, stride=1, padding=1, impl=impl)))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))

  want, got = (vmapped_grad(i)(xs, w) for i in ("xla", "winograd"))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(jnp.max(jnp.abs(b))))


def test_resolution(monkeypatch):
  assert conv.resolve_impl("winograd", 3, 1, 1) == "winograd"
  assert conv.resolve_impl("winograd", 1, 1, 0) == "matmul"
  assert conv.resolve_impl("winograd", 3, 2, 1) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert conv.resolve_impl("winograd", 3, 1, 1) == "xla"
