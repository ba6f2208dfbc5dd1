"""2-D convolution with a backend-selected implementation.

`conv2d` is the single entry point the UNet uses. `impl` chooses how it is
computed: "xla" is `lax.conv_general_dilated`; "matmul" (CPU speed path) and
"auto" (matmul on CPU, xla elsewhere) are provided by the speed work.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: Array, w: Array, stride: int, padding: int) -> Array:
  return lax.conv_general_dilated(
      x, w, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSION_NUMBERS)


def conv2d(x_NHWC: Array, w_HWIO: Array, *, stride: int = 1, padding: int = 0,
           impl: str = "xla") -> Array:
  """Convolution with explicit symmetric padding (PyTorch semantics)."""
  if impl not in ("xla", "auto", "matmul"):
    raise ValueError(f"unknown conv_impl {impl!r}; expected auto|xla|matmul")
  return _xla_conv(x_NHWC, w_HWIO, stride, padding)


def torch_uniform_init(fan_in_axes: Sequence[int]) -> Initializer:
  """PyTorch default for Conv/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  kaiming_uniform(a=sqrt(5)) on the weight reduces to this bound, and the bias
  uses the same bound, so one initializer serves both (bias is given the fan_in
  of its weight via `torch_bias_init`).
  """
  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    fan_in = 1
    for a in fan_in_axes:
      fan_in *= shape[a]
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_bias_init(fan_in: int) -> Initializer:
  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Conv(nn.Module):
  """Conv2D with PyTorch-default init and symmetric padding.

  Params: `kernel` (kh, kw, in, out) HWIO and `bias` (out,).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  zero_init: bool = False
  impl: str = "auto"
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, c_in = self.kernel_size, x.shape[-1]
    fan_in = k * k * c_in
    if self.zero_init:
      w_init, b_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      w_init, b_init = torch_uniform_init((0, 1, 2)), torch_bias_init(fan_in)
    w = self.param("kernel", w_init, (k, k, c_in, self.features), jnp.float32)
    b = self.param("bias", b_init, (self.features,), jnp.float32)
    y = conv2d(x.astype(self.dtype), w.astype(self.dtype), stride=self.stride,
               padding=self.padding, impl=self.impl)
    return y + b.astype(self.dtype)
