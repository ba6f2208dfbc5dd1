"""Original PyTorch JDCL state_dicts (as numpy arrays) -> JointUNet params.

Our module names mirror the PyTorch ones, so the mapping is a rule per tree
path (`param_torch_key`), not a hand-written table of 248+ entries. Layouts:
Conv2d OIHW -> HWIO, attention Conv1d (out, in, 1) -> Dense (in, out), Linear
(out, in) -> (in, out). Our attention keeps the legacy head-major qkv channel
order, so qkv rows need no permutation.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdcl_jax.models import unet

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
TEACHER_PREFIXES = ("old_model.", "new_model.")

# Buffers of the original DDPM module; they live in a full state_dict but are not params.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar"})

_TOP_NAMES = {"out_norm": "out.0", "out_conv": "out.2"}
_CHILD_NAMES = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_dense": "emb_layers.1",
                "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_CONV1D_MODULES = ("qkv", "proj_out")   # nn.Conv1d in the original, Dense here


def param_torch_key(path: Sequence[str]) -> str:
  """Original state_dict key (with `model.diffusion_model.` for UNet params) of a tree path."""
  top, *mid, leaf = path
  name = _TOP_NAMES.get(top) or re.sub(r"_(\d+)", r".\1", top)
  key = ".".join([name] + [_CHILD_NAMES.get(m, m) for m in mid] + [_LEAF_NAMES[leaf]])
  return key if top.startswith("classifier") else UNET_PREFIX + key


def _torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch layout of a leaf of our tree."""
  if path[-1] != "kernel":
    return tuple(shape)
  if len(shape) == 4:                      # HWIO -> OIHW
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  i, o = shape
  return (o, i, 1) if path[-2] in _CONV1D_MODULES else (o, i)


def _to_ours(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  if a.ndim == 3:
    return a[:, :, 0].T
  if a.ndim == 2:
    return a.T
  return a


def torch_param_shapes(config: unet.ModelConfig) -> dict[str, tuple[int, ...]]:
  """{original key: original shape} for every parameter of `config` (no allocation)."""
  flat = traverse_util.flatten_dict(unet.param_shapes(config))
  return {param_torch_key(p): _torch_shape(p, s.shape) for p, s in flat.items()}


def _is_ignorable(key: str) -> bool:
  # Non-parameter entries of a full original checkpoint: schedule buffers,
  # the LitEma shadow, and (in a KD student) the teachers' weights.
  return (key in _SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX)
          or key.startswith(TEACHER_PREFIXES))


def _canonical(state_dict: Mapping[str, Any], key_prefix: str) -> dict[str, Any]:
  """Keys as `param_torch_key` spells them; bare UNet keys gain the prefix."""
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    if key_prefix:
      if not key.startswith(key_prefix):
        continue
      key = key[len(key_prefix):]
    elif _is_ignorable(key):
      continue
    if not key.startswith((UNET_PREFIX, "classifier.")):
      key = UNET_PREFIX + key
    if key in out:
      raise ValueError(f"state_dict holds {key!r} both with and without {UNET_PREFIX!r}")
    out[key] = value
  return out


def params_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                 config: unet.ModelConfig, *, use_ema: bool = False,
                                 key_prefix: str = "") -> dict:
  """Converts an original JDCL state_dict into a JointUNet params tree.

  Args:
    state_dict: key -> array (numpy or anything `np.asarray` takes). UNet keys
      may carry `model.diffusion_model.` or not. Schedule buffers, `model_ema.*`
      and teacher (`old_model.*`, `new_model.*`) entries are ignored.
    config: the model the weights belong to.
    use_ema: read the LitEma shadow (`model_ema.<key without dots>`) instead.
    key_prefix: only read keys under this prefix (e.g. "old_model." for a
      KD teacher); everything else is ignored.

  Returns:
    A nested dict of float32 arrays, structured like `unet.init_params`.

  Raises:
    ValueError naming the offending key(s) on missing or unexpected keys and
    on shape mismatches.
  """
  if use_ema:
    ema = {k[len(key_prefix + EMA_PREFIX):]: v for k, v in state_dict.items()
           if k.startswith(key_prefix + EMA_PREFIX)}
    state_dict = {k: ema[k.replace(".", "")]
                  for k in torch_param_shapes(config) if k.replace(".", "") in ema}
    key_prefix = ""
  sd = _canonical(state_dict, key_prefix)
  flat = traverse_util.flatten_dict(unet.param_shapes(config))
  wanted = {param_torch_key(p): p for p in flat}
  missing = sorted(set(wanted) - set(sd))
  unexpected = sorted(set(sd) - set(wanted))
  if missing or unexpected:
    raise ValueError(f"state_dict does not match the model config: missing keys {missing}, "
                     f"unexpected keys {unexpected}")
  out = {}
  for key, path in wanted.items():
    a = np.asarray(sd[key])
    expected = _torch_shape(path, flat[path].shape)
    if a.shape != expected:
      raise ValueError(f"shape mismatch for {key!r}: state_dict has {a.shape}, "
                       f"the model expects {expected} (PyTorch layout)")
    out[path] = jnp.asarray(_to_ours(a).astype(np.float32))
  return traverse_util.unflatten_dict(out)


def params_to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `params_from_torch_state_dict`: original keys and layouts (numpy)."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    a = np.asarray(leaf, np.float32)
    shape = _torch_shape(path, a.shape)
    if a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:
      a = a.T.reshape(shape)
    out[param_torch_key(path)] = np.ascontiguousarray(a)
  return out


def teacher_state_dict_from_recipe(param_keys: Sequence[str],
                                   shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
                                   seed: int) -> dict[str, np.ndarray]:
  """Regenerates a KD teacher of losses_golden.npz (reference README section 6).

  One numpy legacy RandomState stream is consumed in `param_keys` order, so the
  order matters. `shapes` is a {key: shape} mapping or a list aligned with keys.
  """
  if not isinstance(shapes, Mapping):
    shapes = dict(zip(param_keys, (tuple(s) for s in shapes), strict=True))
  rs = np.random.RandomState(seed)
  out = {}
  for key in param_keys:
    shape = tuple(shapes[key])
    kind = key.rsplit(".", 1)[-1]
    weight_shape = tuple(shapes.get(key[: -len(kind)] + "weight", shape))
    if kind not in ("weight", "bias"):
      raise ValueError(f"teacher recipe has no rule for {key!r}")
    if len(weight_shape) >= 2:          # conv / linear: PyTorch-default bound of the weight
      b = 1.0 / math.sqrt(math.prod(weight_shape[1:]))
      a = rs.uniform(-b, b, size=shape)
    elif kind == "weight":              # GroupNorm weight
      a = rs.uniform(0.9, 1.1, size=shape)
    else:                               # GroupNorm bias
      a = rs.uniform(-0.1, 0.1, size=shape)
    out[key] = a.astype(np.float32)
  return out


_UNSUPPORTED_UNET_OPTIONS = {   # option: the only value this port implements
    "use_scale_shift_norm": True, "resblock_updown": False, "conv_resample": True,
    "dims": 2, "use_spatial_transformer": False, "legacy": True, "num_classes": None,
    "num_heads_upsample": -1, "use_new_attention_order": False}


def model_config_from_fixture_json(cfg: Mapping[str, Any], **overrides: Any) -> unet.ModelConfig:
  """ModelConfig from a fixture's `config_json` (an original JDCL model config)."""
  if "unet_config" not in cfg:
    raise ValueError("config_json has no 'unet_config': this fixture does not describe a "
                     "model; take the config from the unet fixture whose weights it uses")
  p = cfg["unet_config"]["params"]
  for option, supported in _UNSUPPORTED_UNET_OPTIONS.items():
    if option in p and p[option] != supported:
      raise ValueError(f"unet option {option}={p[option]!r} is not supported")
  config = unet.ModelConfig(
      image_size=p["image_size"], in_channels=p["in_channels"], out_channels=p["out_channels"],
      model_channels=p["model_channels"], channel_mult=tuple(p["channel_mult"]),
      num_res_blocks=p["num_res_blocks"],
      attention_resolutions=tuple(p["attention_resolutions"]),
      num_heads=p.get("num_heads", -1), num_head_channels=p.get("num_head_channels", -1),
      dropout=p.get("dropout", cfg.get("dropout", 0.0)),
      classifier_hidden=cfg["classifier_hidden"], num_classes=cfg["num_classes"], **overrides)
  in_features = cfg.get("classifier_in_features")
  if in_features is not None and in_features != unet.feature_dim(config):
    raise ValueError(f"classifier_in_features {in_features} != pooled feature width "
                     f"{unet.feature_dim(config)} of the UNet config")
  return config
