"""2-D convolution with a backend-selected implementation.

`conv2d` is the single entry point the UNet uses. `impl` chooses how it is
computed:

* "xla": `lax.conv_general_dilated` (forward and XLA's own gradients). This is
  the accelerator path and is left exactly as it was.
* "matmul": the CPU speed path. 1x1 stride-1 unpadded convs are a plain
  channel matmul (all three products are GEMMs under autodiff). Every other conv
  is a `jax.custom_vjp` whose weight gradient is kh*kw shifted-window
  contractions of the padded input with the output cotangent, computed in
  batch chunks so the shifted copies stay cache-sized. Forward and input
  gradient stay on XLA's conv kernels because they measured as fast or faster
  than im2col / shifted-matmul variants on CPU (benchmarks/conv_micro.py).
* "auto": resolved per conv at trace time (`resolve_impl`): on CPU "matmul" for
  1x1 stride-1 convs and "xla" for the rest; "xla" on accelerators.
* "winograd": as "auto", but on CPU 3x3 stride-1 padding-1 convs on even-sized
  maps run as Winograd F(2, 3) (models/winograd.py), forward and both gradients.

Padding is explicit and symmetric (PyTorch semantics).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jdcl_jax.models import winograd

Array = jax.Array
Initializer = Callable[..., Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla", "matmul", "winograd")

# Upper bound on the bytes of shifted input windows materialised at once by the
# weight gradient. XLA:CPU gives each large temporary fresh (page-faulting)
# memory, so one 9x-sized copy of a big activation runs at a fraction of memory
# bandwidth; chunking the batch keeps each step's copies in cache (measured
# 2-3x faster on 32x32 activations, 1-16 MiB alike there). Small activations
# fit unchunked, where a scan would only add per-step overhead.
_WINDOW_CHUNK_BYTES = 16 << 20


def resolve_impl(impl: str, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> str:
  """Maps "auto" to the concrete implementation for this backend and conv shape.

  Accelerators keep XLA's (cuDNN/TPU) kernels. On CPU, measured on this project's 2-core AVX-512
  host (benchmarks/conv_micro.py): XLA:CPU routes 3x3 convs to YNNPACK and beats the shifted-matmul
  VJP (fwd+bwd 0.65-1.08x), while 1x1 stride-1 convs are 1.9x faster as a plain channel matmul.
  So "auto" on CPU = matmul for pointwise convs, XLA otherwise. On a 2-core AVX2-only host
  (Zen 3, 2026-12-02) XLA's 3x3 conv fwd+bwd at 32x32 was 4.5x slower than the matmul VJP
  (643 vs 143 ms, 64->64, batch 32), yet whole train steps of the 8x8 and 16x16 models were
  7 % faster with XLA's convs: on such hosts consider `model.conv_impl=matmul` for 32x32
  models (CIFAR) and measure with benchmarks/train_step.py.

  "winograd" (CPU only) = "auto" with 3x3 stride-1 padding-1 convs as Winograd F(2, 3)
  (models/winograd.py; shapes it cannot tile stay on XLA). On a 2-core AVX2 host (Zen 3,
  2026-12-08) it made one-device local steps 11-24 % faster (digits, 16x16 model) and
  data-parallel ones on two devices no faster, so "auto" does not pick it.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}; expected auto|xla|matmul|winograd")
  if impl in ("auto", "winograd"):
    if jax.default_backend() != "cpu":
      return "xla"
    if kernel_size == 1 and stride == 1 and padding == 0:
      return "matmul"
    if impl == "winograd" and (kernel_size, stride, padding) == (3, 1, 1):
      return "winograd"
    return "xla"
  return impl


def _xla_conv(x: Array, w: Array, stride: int, padding: int) -> Array:
  return lax.conv_general_dilated(
      x, w, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSION_NUMBERS)


def _accum_dtype(dtype: Any) -> Any:
  """f32 accumulation for low-precision inputs; f64 stays f64 under x64."""
  return jnp.promote_types(dtype, jnp.float32)


def _conv_out_size(size: int, k: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - k) // stride + 1


def _windows(x: Array, k: int, stride: int, padding: int,
             out_hw: tuple[int, int]) -> list[Array]:
  """The kh*kw shifted (and strided) windows of the padded input, row-major.

  Window (a, b) holds xpad[:, a + stride*i, b + stride*j, :] for every output
  position (i, j), so conv(x, w) == sum_ab windows[a*k+b] @ w[a, b].
  """
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho, wo = out_hw
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  return [xp[:, a:a + span_h:stride, b:b + span_w:stride, :]
          for a in range(k) for b in range(k)]


def _weight_grad_block(x: Array, g: Array, k: int, stride: int,
                       padding: int) -> Array:
  """dW for one batch block: one (C, O) contraction per kernel tap.

  Each tap contracts all batch*output positions of its window with the
  cotangent: a GEMM with a long reduction, in place of XLA:CPU's
  conv-backprop-filter, which JAX_STACK section 7 measured at ~20x the forward.
  """
  acc = _accum_dtype(x.dtype)
  taps = [jnp.einsum("nhwc,nhwo->co", win, g, preferred_element_type=acc)
          for win in _windows(x, k, stride, padding, g.shape[1:3])]
  return jnp.stack(taps).reshape(k, k, x.shape[-1], g.shape[-1])


def _batch_block(batch: int, bytes_per_example: int) -> int:
  """Largest divisor of `batch` whose windows fit the chunk budget (>= 1)."""
  best = 1
  for n in range(1, batch + 1):
    if batch % n == 0 and n * bytes_per_example <= _WINDOW_CHUNK_BYTES:
      best = n
  return best


def _weight_grad(x: Array, g: Array, k: int, stride: int,
                 padding: int) -> Array:
  """dW = sum over batch blocks of `_weight_grad_block`, via lax.scan."""
  batch = x.shape[0]
  per_example = k * k * g.shape[1] * g.shape[2] * x.shape[-1] * x.dtype.itemsize
  block = _batch_block(batch, per_example)
  if block == batch:
    return _weight_grad_block(x, g, k, stride, padding)
  xs = x.reshape(batch // block, block, *x.shape[1:])
  gs = g.reshape(batch // block, block, *g.shape[1:])

  def step(total: Array, xg: tuple[Array, Array]) -> tuple[Array, None]:
    return total + _weight_grad_block(xg[0], xg[1], k, stride, padding), None

  # The first block seeds the carry (not zeros): inside shard_map the carry must have the
  # blocks' type, which varies over the mapped axis when x does.
  first = _weight_grad_block(xs[0], gs[0], k, stride, padding)
  total, _ = lax.scan(step, first, (xs[1:], gs[1:]))
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_conv(x: Array, w: Array, stride: int, padding: int) -> Array:
  """kxk (or strided / padded) conv with the shifted-window weight gradient."""
  return _shifted_conv_fwd(x, w, stride, padding)[0]


def _shifted_conv_fwd(x: Array, w: Array, stride: int,
                      padding: int) -> tuple[Array, tuple[Array, Array]]:
  # Forward stays on XLA's conv: on CPU it beat im2col (one big concat) and
  # 9 shifted GEMMs (9 window copies + a 9-way add) on every measured shape.
  y = lax.conv_general_dilated(
      x, w, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSION_NUMBERS,
      preferred_element_type=_accum_dtype(x.dtype))
  return y.astype(x.dtype), (x, w)


def _shifted_conv_bwd(stride: int, padding: int, res: tuple[Array, Array],
                      g: Array) -> tuple[Array, Array]:
  x, w = res
  # Input gradient: XLA's transposed conv measured as fast as the shifted
  # (col2im) variant, so keep the kernel XLA already tunes. linear_transpose
  # avoids re-running the forward, which jax.vjp would do outside jit. `x` itself (not a
  # ShapeDtypeStruct) is the primal so dx keeps x's type, including whether it varies over
  # a shard_map axis (data-parallel steps), which the custom_vjp checks.
  transpose = jax.linear_transpose(lambda xx: _xla_conv(xx, w, stride, padding), x)
  (dx,) = transpose(g.astype(x.dtype))
  dw = _weight_grad(x, g.astype(x.dtype), w.shape[0], stride, padding)
  return dx, dw.astype(w.dtype)


_shifted_conv.defvjp(_shifted_conv_fwd, _shifted_conv_bwd)


def _pointwise_conv(x: Array, w: Array) -> Array:
  """1x1 stride-1 conv as a channel matmul; autodiff keeps dX and dW GEMMs."""
  y = jnp.einsum("nhwc,co->nhwo", x, w[0, 0],
                 preferred_element_type=_accum_dtype(x.dtype))
  return y.astype(x.dtype)


def _matmul_conv(x: Array, w: Array, stride: int, padding: int) -> Array:
  kh, kw = w.shape[:2]
  if kh != kw:
    raise ValueError(f"square kernels only, got {kh}x{kw}")
  if kh == 1 and stride == 1 and padding == 0:
    return _pointwise_conv(x, w)
  return _shifted_conv(x, w, stride, padding)


def conv2d(x_NHWC: Array, w_HWIO: Array, *, stride: int = 1, padding: int = 0,
           impl: str = "xla") -> Array:
  """Convolution with explicit symmetric padding (PyTorch semantics).

  x is NHWC, w is HWIO; the output has x's dtype. "matmul" accumulates
  low-precision inputs in float32.
  """
  chosen = resolve_impl(impl, w_HWIO.shape[0], stride, padding)
  if chosen == "winograd" and winograd.supported(x_NHWC.shape, w_HWIO.shape[0], stride, padding):
    return winograd.conv3x3(x_NHWC, w_HWIO)
  if chosen == "matmul":
    return _matmul_conv(x_NHWC, w_HWIO, stride, padding)
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
