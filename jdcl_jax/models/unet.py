"""Joint UNet: one network that is a DDPM eps-denoiser and a pooled classifier.

A faithful port of ldm's openaimodel `UNetModel` as JDCL configures it
(scale-shift norm, legacy attention, conv resampling, no class conditioning)
plus the JDCL "pooling" classifier head (spec 1.2).

Submodule names mirror the original PyTorch modules (`input_blocks_4_0` is
`input_blocks.4.0`) so that `port.py` can map state_dict keys by rule.
Call with `model.apply({"params": params}, x_BHWC, t_B, train=...)`; dropout
draws from the `"dropout"` rng stream when `train=True`, one mask per example
(`ExampleDropout`), so a data-parallel step equals the single-device one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdcl_jax.models import dropout as dropout_lib, norm
from jdcl_jax.models.conv import Conv, torch_bias_init, torch_uniform_init

Array = jax.Array

_GN_GROUPS = 32
_GN_EPS = 1e-5   # PyTorch GroupNorm default
_MAX_PERIOD = 10000.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  image_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 3
  attention_resolutions: tuple[int, ...] = (2, 4)   # downsample factors, as ldm reads them
  num_heads: int = 4
  num_head_channels: int = -1                      # >0 overrides num_heads (ImageNet-100: 64)
  dropout: float = 0.1
  classifier_hidden: int = 1024
  num_classes: int = 10
  conv_impl: str = "auto"                          # auto|xla|matmul|winograd
  dtype: str = "float32"                           # compute dtype (params always float32)


def cifar10_model_config(**overrides: Any) -> ModelConfig:
  """CIFAR-10 JDCL UNet (spec 1.1): 56,355,341 parameters."""
  return dataclasses.replace(ModelConfig(), **overrides)


def cifar100_model_config(**overrides: Any) -> ModelConfig:
  """CIFAR-100: the CIFAR-10 network with a 100-way head (56,447,591)."""
  return dataclasses.replace(ModelConfig(num_classes=100), **overrides)


def imagenet100_model_config(**overrides: Any) -> ModelConfig:
  """ImageNet-100 at 64 px (125,613,671 parameters).

  The config's attention_resolutions [32, 16, 8] are downsample factors, so
  only ds = 8 exists (spec 1.1 [quirk]); kept verbatim for fidelity.
  """
  cfg = ModelConfig(image_size=64, model_channels=192, attention_resolutions=(32, 16, 8),
                    num_head_channels=64, classifier_hidden=2048, num_classes=100)
  return dataclasses.replace(cfg, **overrides)


def tiny_model_config(**overrides: Any) -> ModelConfig:
  """The tiny model of the golden fixtures (1,777,517 parameters)."""
  cfg = ModelConfig(image_size=16, model_channels=32, channel_mult=(1, 2, 2),
                    num_res_blocks=2, attention_resolutions=(2,), num_heads=4,
                    classifier_hidden=64, num_classes=10)
  return dataclasses.replace(cfg, **overrides)


# --------------------------------------------------------------------------- layers


class Linear(nn.Module):
  """Dense layer with PyTorch's default init; kernel is (in, out)."""
  features: int
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    if self.zero_init:
      w_init, b_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      w_init, b_init = torch_uniform_init((0,)), torch_bias_init(fan_in)
    w = self.param("kernel", w_init, (fan_in, self.features), jnp.float32)
    b = self.param("bias", b_init, (self.features,), jnp.float32)
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype)) + b.astype(self.dtype)


class GroupNorm32(nn.Module):
  """GroupNorm(32, eps 1e-5) computed in float32 whatever the compute dtype (ldm GroupNorm32).

  Params `scale` (weight) and `bias`, both (C,). Two-pass variance: the fast
  E[x^2] - E[x]^2 form loses digits against PyTorch.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    y = norm.group_norm(x.astype(jnp.float32), scale, bias, groups=_GN_GROUPS, eps=_GN_EPS)
    return y.astype(x.dtype)


def timestep_embedding(t_B: Array, dim: int) -> Array:
  """Sinusoidal embedding, [cos, sin] halves (ldm order), float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_B.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ExampleDropout(nn.Module):
  """Dropout whose mask for example i depends only on (the layer's key, i).

  flax's nn.Dropout draws one mask for the whole array, so a batch split over devices (the
  shard_map of steps.data_parallel_grad) would need one key per device and every device count
  would train a different model. Here example i of the global batch gets
  fold_in(key, i), with i offset by the shard's position on `batch_axis` inside shard_map, so
  any data-parallel device count draws the same masks (1 vs 2 devices: tests/test_sharding.py).
  The masks are jax.random.bernoulli's, computed as one fused kernel (models/dropout.py).
  """
  rate: float
  batch_axis: str | None = None
  example_ids: Array | None = None   # the rows' global batch positions, when not consecutive

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    key, n = self.make_rng("dropout"), x.shape[0]
    if self.example_ids is not None:
      index = self.example_ids
    else:
      first = 0 if self.batch_axis is None else jax.lax.axis_index(self.batch_axis) * n
      index = first + jnp.arange(n)
    keep = dropout_lib.example_keep_masks(key, index, x.shape[1:], 1.0 - self.rate)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class ResBlock(nn.Module):
  """ldm ResBlock with use_scale_shift_norm=True."""
  out_channels: int
  dropout: float
  conv_impl: str
  dtype: Any
  batch_axis: str | None = None
  example_ids: Array | None = None

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool) -> Array:
    conv = functools.partial(Conv, impl=self.conv_impl, dtype=self.dtype)
    h = conv(self.out_channels, name="in_conv")(nn.silu(GroupNorm32(name="in_norm")(x)))
    emb_out = Linear(2 * self.out_channels, dtype=self.dtype, name="emb_dense")(nn.silu(emb))
    scale, shift = jnp.split(emb_out[:, None, None, :], 2, axis=-1)   # scale is the first half
    h = GroupNorm32(name="out_norm")(h) * (1 + scale) + shift
    h = ExampleDropout(self.dropout, self.batch_axis, self.example_ids)(
        nn.silu(h), deterministic=not train)
    h = conv(self.out_channels, zero_init=True, name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel_size=1, padding=0, name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """ldm AttentionBlock with QKVAttentionLegacy (heads split before q/k/v)."""
  num_heads: int
  num_head_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    heads = self.num_heads if self.num_head_channels == -1 else c // self.num_head_channels
    d = c // heads
    qkv = Linear(3 * c, dtype=self.dtype, name="qkv")(
        GroupNorm32(name="norm")(x).reshape(b, hh * ww, c))
    # Legacy channel order h*3d + j*d + c  ->  [B, T, heads, (q|k|v), d].
    qkv = qkv.reshape(b, hh * ww, heads, 3, d)
    scale = d ** -0.25   # applied to q and k separately, as the original does
    q, k, v = qkv[..., 0, :] * scale, qkv[..., 1, :] * scale, qkv[..., 2, :]
    logits = jnp.einsum("bthd,bshd->bhts", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    a = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, hh * ww, c)   # head-major
    h = Linear(c, zero_init=True, dtype=self.dtype, name="proj_out")(a)
    return x + h.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  """Strided 3x3 conv; explicit (1, 1) padding like PyTorch (not Flax 'SAME')."""
  conv_impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv(x.shape[-1], stride=2, padding=1, impl=self.conv_impl, dtype=self.dtype,
                name="op")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then 3x3 conv."""
  conv_impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], impl=self.conv_impl, dtype=self.dtype, name="conv")(x)


def _apply_layers(layers: Sequence[nn.Module], h: Array, emb: Array, train: bool) -> Array:
  """One ldm TimestepEmbedSequential: only ResBlocks see the embedding."""
  for layer in layers:
    h = layer(h, emb, train) if isinstance(layer, ResBlock) else layer(h)
  return h


# --------------------------------------------------------------------------- model


class JointUNet(nn.Module):
  """UNet eps-denoiser whose pooled encoder features also feed a classifier.

  `batch_axis`: set (via `model.clone`) when the batch is one shard of a batch split over that
  shard_map axis, so dropout masks follow global example indices (`ExampleDropout`).
  `example_ids`: set instead when the rows are a gathered subset of the batch (the KD
  teachers, steps.teacher_targets): their global batch positions.
  """
  config: ModelConfig
  batch_axis: str | None = None
  example_ids: Array | None = None

  def setup(self) -> None:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    res = functools.partial(ResBlock, dropout=cfg.dropout, conv_impl=cfg.conv_impl, dtype=dtype,
                            batch_axis=self.batch_axis, example_ids=self.example_ids)
    attn = functools.partial(AttentionBlock, num_heads=cfg.num_heads,
                             num_head_channels=cfg.num_head_channels, dtype=dtype)
    ch = cfg.model_channels
    self.time_embed_0 = Linear(4 * ch, dtype=dtype)
    self.time_embed_2 = Linear(4 * ch, dtype=dtype)
    # Encoder. Layers infer their input width, so unlike ldm no channel
    # bookkeeping is needed; `ds` (downsample factor) decides attention.
    inputs, ds = [[Conv(ch, impl=cfg.conv_impl, dtype=dtype)]], 1
    for level, mult in enumerate(cfg.channel_mult):
      for _ in range(cfg.num_res_blocks):
        ch = mult * cfg.model_channels
        layers = [res(ch)] + ([attn()] if ds in cfg.attention_resolutions else [])
        inputs.append(layers)
      if level != len(cfg.channel_mult) - 1:
        inputs.append([Downsample(cfg.conv_impl, dtype)])
        ds *= 2
    self.input_blocks = inputs
    self.middle_block = [res(ch), attn(), res(ch)]
    # Decoder: num_res_blocks + 1 blocks per level; the last of each non-final level upsamples.
    outputs = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
      for i in range(cfg.num_res_blocks + 1):
        ch = mult * cfg.model_channels
        layers = [res(ch)] + ([attn()] if ds in cfg.attention_resolutions else [])
        if level and i == cfg.num_res_blocks:
          layers.append(Upsample(cfg.conv_impl, dtype))
          ds //= 2
        outputs.append(layers)
    self.output_blocks = outputs
    self.out_norm = GroupNorm32()
    self.out_conv = Conv(cfg.out_channels, zero_init=True, impl=cfg.conv_impl, dtype=dtype)
    self.classifier_0 = Linear(cfg.classifier_hidden, dtype=dtype)
    self.classifier_dropout = ExampleDropout(cfg.dropout, self.batch_axis, self.example_ids)
    self.classifier_3 = Linear(cfg.num_classes, dtype=dtype)

  def _embed(self, t_B: Array) -> Array:
    emb = timestep_embedding(t_B, self.config.model_channels).astype(jnp.dtype(self.config.dtype))
    return self.time_embed_2(nn.silu(self.time_embed_0(emb)))

  def _encode(self, x_BHWC: Array, emb: Array, train: bool) -> list[Array]:
    """Encoder block outputs followed by the middle-block output (forward order)."""
    h = x_BHWC.astype(jnp.dtype(self.config.dtype))
    hs = []
    for layers in self.input_blocks:
      h = _apply_layers(layers, h, emb, train)
      hs.append(h)
    hs.append(_apply_layers(self.middle_block, h, emb, train))
    return hs

  def _pool(self, hs: Sequence[Array]) -> Array:
    # pool_size 10000 exceeds every spatial size: global average pooling (spec 1.2).
    return jnp.concatenate([jnp.mean(h.astype(jnp.float32), axis=(1, 2)) for h in hs], axis=-1)

  def _head(self, feats_BF: Array, train: bool) -> Array:
    h = nn.leaky_relu(self.classifier_0(feats_BF), negative_slope=0.2)
    h = self.classifier_dropout(h, deterministic=not train)
    return self.classifier_3(h).astype(jnp.float32)

  def _decode(self, hs: Sequence[Array], emb: Array, train: bool) -> list[Array]:
    """Decoder block outputs; each block first concatenates [h, popped skip]."""
    h, skips, outs = hs[-1], list(hs[:-1]), []
    for layers in self.output_blocks:
      h = _apply_layers(layers, jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
      outs.append(h)
    return outs

  def __call__(self, x_BHWC: Array, t_B: Array, *, train: bool) -> Array:
    """Denoising pass: eps prediction (float32) for x_t at integer timesteps t."""
    emb = self._embed(t_B)
    h = self._decode(self._encode(x_BHWC, emb, train), emb, train)[-1]
    return self.out_conv(nn.silu(self.out_norm(h))).astype(jnp.float32)

  def debug_activations(self, x_BHWC: Array, t_B: Array, *, train: bool) -> dict[str, Any]:
    """Intermediates matching the fixtures' debug_* arrays (for localising mismatches)."""
    sinusoid = timestep_embedding(t_B, self.config.model_channels)
    emb = self._embed(t_B)
    hs = self._encode(x_BHWC, emb, train)
    return {"temb_sinusoidal": sinusoid, "temb_mlp": emb, "hs": hs,
            "out": self._decode(hs, emb, train)}

  def features(self, x_BHWC: Array, t_B: Array, *, train: bool) -> Array:
    """Pooled encoder + middle features (float32, [B, F]) of (x, t)."""
    return self._pool(self._encode(x_BHWC, self._embed(t_B), train))

  def classify(self, x_BHWC: Array, *, train: bool) -> Array:
    """Logits of the clean image: encoder + middle at t = 0, pool, MLP (decoder not run)."""
    t_B = jnp.zeros((x_BHWC.shape[0],), jnp.float32)
    return self._head(self.features(x_BHWC, t_B, train=train), train)

  def head(self, feats_BF: Array, *, train: bool) -> Array:
    """The classifier MLP alone, for callers that already hold pooled features."""
    return self._head(feats_BF, train)


# --------------------------------------------------------------------------- init


def feature_dim(config: ModelConfig) -> int:
  """Width of the pooled classifier input: every encoder output plus the middle block."""
  widths, ch = [config.model_channels], config.model_channels
  for level, mult in enumerate(config.channel_mult):
    ch = mult * config.model_channels
    widths += [ch] * config.num_res_blocks
    if level != len(config.channel_mult) - 1:
      widths.append(ch)
  return sum(widths) + ch


def _init_all(model: JointUNet, x_BHWC: Array, t_B: Array) -> tuple[Array, Array]:
  # `__call__` never touches the head and `classify` never touches the decoder:
  # run both so every parameter is created.
  return model(x_BHWC, t_B, train=False), model.classify(x_BHWC, train=False)


def _init_variables(config: ModelConfig, rng: Array) -> dict:
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return JointUNet(config).init({"params": rng}, x, t, method=_init_all)


# Runs once per model, so compile time is all that matters: without LLVM optimisation the
# ~150 threefry draws compile in 4.1 s instead of 7.8 s on the 2-core CPU host (digits model;
# the init itself then takes 0.04 s instead of 0.01 s). Values agree to float32 rounding (3e-8).
@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})
def _init_params_jit(config: ModelConfig, rng: Array) -> dict:
  return _init_variables(config, rng)["params"]


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Fresh float32 parameters with PyTorch-default init (jit-compiled)."""
  return _init_params_jit(config, rng)


def param_shapes(config: ModelConfig) -> dict:
  """Parameter tree of ShapeDtypeStructs; allocates nothing."""
  return jax.eval_shape(lambda: _init_variables(config, jax.random.key(0))["params"])


def count_params(config: ModelConfig) -> int:
  """Number of parameters, via eval_shape (no allocation)."""
  return sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(param_shapes(config)))
