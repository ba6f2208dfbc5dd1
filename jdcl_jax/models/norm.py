"""GroupNorm with a hand-written backward pass.

Why: on XLA:CPU the small UNets of the CPU demos are bound by the number of
kernels per step, not by FLOPs. Autodiff of the two-pass GroupNorm emits a
long chain of broadcasts and reductions per norm (there are 46 norms in the
digits UNet); the closed-form backward below needs two reductions per norm
plus the per-channel parameter sums. Same math, float32, so it matches
autodiff to rounding (tests/test_model.py checks values and gradients).

Statistics are two-pass (mean, then mean of squared deviations), as PyTorch
computes them: the one-pass E[x^2] - E[x]^2 form loses digits against the
golden fixtures.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _grouped(x: Array, groups: int) -> Array:
  """(B, ..., C) -> (B, S, G, C/G) with S the flattened spatial size."""
  b, c = x.shape[0], x.shape[-1]
  if c % groups:
    raise ValueError(f"GroupNorm: {c} channels are not divisible by {groups} groups")
  return x.reshape(b, -1, groups, c // groups)


def _stats(xg: Array, eps: float) -> tuple[Array, Array]:
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


def _forward(x: Array, scale: Array, bias: Array, groups: int,
             eps: float) -> tuple[Array, tuple[Array, Array, Array]]:
  xg = _grouped(x, groups)
  mean, rstd = _stats(xg, eps)
  xhat = (xg - mean) * rstd
  y = xhat.reshape(x.shape) * scale + bias
  return y, (xhat, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
  return _forward(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
  y, res = _forward(x, scale, bias, groups, eps)
  return y, res


def _group_norm_bwd(groups, eps, res, g):
  del groups, eps   # the group count is xhat's axis 2
  xhat, rstd, scale = res
  gg = _grouped(g, xhat.shape[2])
  reduce_axes = tuple(range(g.ndim - 1))
  dbias = jnp.sum(g, axis=reduce_axes)
  dscale = jnp.sum((gg * xhat).reshape(g.shape), axis=reduce_axes)
  dxhat = gg * scale.reshape(xhat.shape[2:])
  # d/dx of (x - mean) * rstd, per (example, group): the two group means below.
  m1 = jnp.mean(dxhat, axis=(1, 3), keepdims=True)
  m2 = jnp.mean(dxhat * xhat, axis=(1, 3), keepdims=True)
  dx = (rstd * (dxhat - m1 - xhat * m2)).reshape(g.shape)
  return dx, dscale, dbias


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: Array, scale: Array, bias: Array, *, groups: int, eps: float) -> Array:
  """y = (x - mean_g) / sqrt(var_g + eps) * scale + bias over (spatial, channels-in-group).

  x: (B, ..., C) float32; scale, bias: (C,). Statistics per example and group.
  """
  return _group_norm(x, scale, bias, groups, eps)
