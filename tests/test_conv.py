"""conv2d: impl="matmul" (and "auto" on CPU) must equal lax.conv_general_dilated.

Forward, input gradient and weight gradient are compared at the conv kinds the
UNet uses (3x3 s1 p1, 3x3 s2 p1, 1x1 s1 p0), odd and even sizes, 1 and 3 input
channels, batch 1 and >1; plus the batch-chunked weight gradient, jit / eager /
vmap, bf16, "auto" resolution and the Conv module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.models import conv

RTOL = 1e-5  # relative to the largest magnitude of the reference

# (kernel, stride, padding)
KINDS = [(3, 1, 1), (3, 2, 1), (1, 1, 0)]
# (batch, size, c_in): odd/even size, 1/3 channels and batch 1/>1 all appear.
SHAPES = [(1, 7, 1), (3, 8, 3), (2, 7, 1)]


def _inputs(batch: int, size: int, c_in: int, c_out: int, k: int, stride: int,
            padding: int, dtype=jnp.float32):
  kx, kw, kg = jax.random.split(jax.random.key(batch * 100 + size * 10 + c_in), 3)
  x = jax.random.normal(kx, (batch, size, size, c_in), dtype)
  w = jax.random.normal(kw, (k, k, c_in, c_out), dtype)
  out = (size + 2 * padding - k) // stride + 1
  g = jax.random.normal(kg, (batch, out, out, c_out), dtype)
  return x, w, g


def _fwd_and_grads(impl: str, stride: int, padding: int):
  def run(x, w, g):
    y, vjp = jax.vjp(
        lambda a, b: conv.conv2d(a, b, stride=stride, padding=padding, impl=impl),
        x, w)
    return (y,) + vjp(g)
  return run


def _assert_close(got, want, rtol: float = RTOL) -> None:
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "k{}s{}p{}".format(*k))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}c{}".format(*s))
def test_matmul_matches_xla(kind, shape):
  k, stride, padding = kind
  x, w, g = _inputs(*shape, c_out=4, k=k, stride=stride, padding=padding)
  want = jax.jit(_fwd_and_grads("xla", stride, padding))(x, w, g)
  got = jax.jit(_fwd_and_grads("matmul", stride, padding))(x, w, g)
  _assert_close(got, want)


@pytest.mark.parametrize("kind", [(3, 1, 0), (1, 2, 0), (3, 2, 2)])
def test_generic_kinds_use_shifted_path(kind):
  """Kinds the UNet does not use still go through the custom VJP correctly."""
  k, stride, padding = kind
  x, w, g = _inputs(2, 9, 3, 5, k, stride, padding)
  want = _fwd_and_grads("xla", stride, padding)(x, w, g)
  got = _fwd_and_grads("matmul", stride, padding)(x, w, g)  # eager, no jit
  _assert_close(got, want)


@pytest.mark.parametrize("batch", [4, 3])
def test_chunked_weight_grad(monkeypatch, batch):
  """A tiny window budget forces the lax.scan over batch blocks (2 or 1 per step)."""
  x, w, g = _inputs(batch, 8, 3, 4, 3, 1, 1)
  per_example = 9 * 8 * 8 * 3 * 4
  monkeypatch.setattr(conv, "_WINDOW_CHUNK_BYTES", 2 * per_example)
  assert conv._batch_block(batch, per_example) == (2 if batch == 4 else 1)
  want = _fwd_and_grads("xla", 1, 1)(x, w, g)
  got = jax.jit(_fwd_and_grads("matmul", 1, 1))(x, w, g)
  _assert_close(got, want)


@pytest.mark.parametrize("chunked", [False, True])
def test_custom_vjp_grads_inside_shard_map(monkeypatch, chunked):
  """Data-parallel steps differentiate the convs inside shard_map, where values split over
  the mesh axis are typed as varying (even on a 1-device mesh): the custom VJPs' dx (matmul,
  winograd) and the chunked weight-gradient scan must keep that type (both once raised a type
  error)."""
  x, w, _ = _inputs(4, 8, 3, 4, 3, 1, 1)
  if chunked:
    monkeypatch.setattr(conv, "_WINDOW_CHUNK_BYTES", 2 * 9 * 8 * 8 * 3 * 4)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  P = jax.sharding.PartitionSpec

  def loss(impl):
    def per_shard(ww, xx):
      ww = jax.lax.pcast(ww, "data", to="varying")
      y = conv.conv2d(xx, ww, stride=1, padding=1, impl=impl)
      return jax.lax.psum(jnp.sum(jnp.sin(y)), "data")
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())

  grads = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(w, x)
           for impl in ("xla", "matmul", "winograd")}
  for impl in ("matmul", "winograd"):
    for a, b in zip(grads[impl], grads["xla"]):
      np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(jnp.max(jnp.abs(b))))


def test_vmap_of_grad():
  x, w, _ = _inputs(2, 7, 3, 4, 3, 2, 1)
  xs = jnp.stack([x, 2.0 * x])

  def loss(impl):
    return lambda xx, ww: jnp.sum(
        jnp.sin(conv.conv2d(xx, ww, stride=2, padding=1, impl=impl)))

  grads = {impl: jax.jit(jax.vmap(jax.grad(loss(impl), argnums=(0, 1)),
                                  in_axes=(0, None)))(xs, w)
           for impl in ("xla", "matmul")}
  for a, b in zip(grads["matmul"], grads["xla"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("kind", [(3, 1, 1), (1, 1, 0)])
def test_bf16_inputs(kind):
  k, stride, padding = kind
  x, w, g = _inputs(2, 8, 3, 4, k, stride, padding)
  bf = [a.astype(jnp.bfloat16) for a in (x, w, g)]
  got = jax.jit(_fwd_and_grads("matmul", stride, padding))(*bf)
  want = _fwd_and_grads("xla", stride, padding)(*[a.astype(jnp.float32) for a in bf])
  assert all(a.dtype == jnp.bfloat16 for a in got)
  # Rounding of the bf16 outputs only: accumulation is float32.
  _assert_close([a.astype(jnp.float32) for a in got], want, rtol=1e-2)


def test_auto_resolution(monkeypatch):
  assert jax.default_backend() == "cpu"
  # CPU: XLA for 3x3 (faster on this host), a channel matmul for pointwise convs.
  assert conv.resolve_impl("auto", 3, 1, 1) == "xla"
  assert conv.resolve_impl("auto", 3, 2, 1) == "xla"
  assert conv.resolve_impl("auto", 1, 1, 0) == "matmul"
  assert conv.resolve_impl("xla", 1, 1, 0) == "xla"
  assert conv.resolve_impl("matmul", 3, 1, 1) == "matmul"
  x, w, _ = _inputs(1, 7, 1, 2, 3, 1, 1)
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, stride=1, padding=1,
                                                      impl="matmul"))(x, w))
  assert "custom_vjp" in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, stride=1, padding=1,
                                                      impl="auto"))(x, w))
  assert "conv_general_dilated" in jaxpr and "custom_vjp" not in jaxpr
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert conv.resolve_impl("auto", 1, 1, 0) == "xla"


def test_invalid_impl():
  x, w, _ = _inputs(1, 7, 1, 2, 3, 1, 1)
  with pytest.raises(ValueError, match="conv_impl"):
    conv.conv2d(x, w, stride=1, padding=1, impl="cudnn")
  with pytest.raises(ValueError, match="conv_impl"):
    conv.Conv(2, impl="fast").init(jax.random.key(0), x)


def test_conv_module_impls_agree():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = conv.Conv(5, stride=2, impl="xla").init(jax.random.key(1), x)
  assert params["params"]["kernel"].shape == (3, 3, 3, 5)
  assert params["params"]["bias"].shape == (5,)
  bound = 1.0 / np.sqrt(27)
  assert float(jnp.max(jnp.abs(params["params"]["kernel"]))) <= bound
  outs = {impl: conv.Conv(5, stride=2, impl=impl).apply(params, x)
          for impl in ("xla", "matmul", "auto")}
  for impl in ("matmul", "auto"):
    np.testing.assert_allclose(outs[impl], outs["xla"], rtol=0, atol=1e-5)
