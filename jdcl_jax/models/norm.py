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


def _flat(x: Array, groups: int) -> Array:
  """(B, ..., C) -> (B, S, C) with S the flattened spatial size."""
  b, c = x.shape[0], x.shape[-1]
  if c % groups:
    raise ValueError(f"GroupNorm: {c} channels are not divisible by {groups} groups")
  return x.reshape(b, -1, c)


def _group_mean(per_channel_sum: Array, groups: int, n: int) -> Array:
  """(B, C) per-channel sums -> (B, 1, C): each channel gets its group's sum / n."""
  b, c = per_channel_sum.shape
  s = per_channel_sum.reshape(b, groups, c // groups).sum(-1, keepdims=True) / n
  return jnp.broadcast_to(s, (b, groups, c // groups)).reshape(b, 1, c)


# Every reduction below first sums over the spatial axis with the channels contiguous, then
# over the few channels of a group on a tiny (B, C) array: XLA:CPU vectorises that along C,
# where a direct reduction over the (spatial, channel-in-group) axes of a (B, S, G, C/G) view
# is strided. Digits-sized norms: forward 1.3-1.8x, forward + backward 1.2-1.8x faster
# (benchmarks/README.md).


def _forward(x: Array, scale: Array, bias: Array, groups: int,
             eps: float) -> tuple[Array, tuple[Array, Array, Array]]:
  xs = _flat(x, groups)
  n = xs.shape[1] * (xs.shape[2] // groups)
  d = xs - _group_mean(jnp.sum(xs, axis=1), groups, n)
  rstd = jax.lax.rsqrt(_group_mean(jnp.sum(d * d, axis=1), groups, n) + eps)
  xhat = d * rstd
  return (xhat * scale + bias).reshape(x.shape), (xhat, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
  return _forward(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
  y, res = _forward(x, scale, bias, groups, eps)
  return y, res


def _group_norm_bwd(groups, eps, res, g):
  del eps
  xhat, rstd, scale = res                    # xhat: (B, S, C)
  n = xhat.shape[1] * (xhat.shape[2] // groups)
  gs = g.reshape(xhat.shape)
  g_sum = jnp.sum(gs, axis=1)                # (B, C)
  gx_sum = jnp.sum(gs * xhat, axis=1)        # (B, C)
  # d/dx of (x - mean) * rstd with dxhat = g * scale, per (example, group):
  # rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)).
  m1 = _group_mean(g_sum * scale, groups, n)
  m2 = _group_mean(gx_sum * scale, groups, n)
  dx = (rstd * (gs * scale - m1 - xhat * m2)).reshape(g.shape)
  return dx, jnp.sum(gx_sum, axis=0), jnp.sum(g_sum, axis=0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: Array, scale: Array, bias: Array, *, groups: int, eps: float) -> Array:
  """y = (x - mean_g) / sqrt(var_g + eps) * scale + bias over (spatial, channels-in-group).

  x: (B, ..., C) float32; scale, bias: (C,). Statistics per example and group.
  """
  return _group_norm(x, scale, bias, groups, eps)
