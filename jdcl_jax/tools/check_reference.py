"""Checks jdcl_jax against a PyTorch golden fixture (shared/reference/*.npz).

  python -m jdcl_jax.tools.check_reference FIXTURE.npz [--weights UNET.npz]

Prints ONE JSON line: for every stored output it can check, the max |ours - ref|
(`max_abs`), that divided by max |ref| (`max_rel`), the bound it must meet
(`tol` = atol + rtol * max|ref|) and `ok`. Exit status: 0 all pass, 1 some
check fails, 2 nothing could be checked (e.g. weights not found).

What is checked depends on which arrays the fixture holds, not on its name:
  unet      eps_nhwc / features_* / logits_t0 (+ debug_* when present)
  schedule  every <Schedule field>_f32 / _f64 and ddim_<field>_<S> array
  ddim      steps_* per step, samples, replay logits and labels
  losses    every local_* and kd_* term, plus the stored intermediates
DDIM and losses fixtures store no weights: they use the tiny model of the unet
fixture, found via --weights, else `unet_tiny_golden.npz` (or any npz holding
`param_keys`) in the fixture's folder.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import sys
import traceback
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdcl_jax.diffusion import losses, sampler, schedule
from jdcl_jax.models import port, unet

# (atol, rtol relative to max|ref|); reference README section 7, plus headroom
# over its measured float32 noise floor (UNet 3e-6, losses 2.4e-7).
MODEL_TOL = (1e-5, 1e-5)
LOSS_TOL = (1e-6, 0.0)
DDIM_TOL = (1e-5, 1e-5)
SCHEDULE_TOL = (0.0, 1e-6)     # f32 tables: a few ulp at most (ours are bit-identical)
F64_TOL = (0.0, 1e-12)
EXACT = (0.0, 0.0)
DEFAULT_WEIGHTS = "unet_tiny_golden.npz"


class Report:
  """Collects named comparisons."""

  def __init__(self) -> None:
    self.checks: dict[str, dict[str, Any]] = {}

  def add(self, name: str, ours: Any, ref: Any, tol: tuple[float, float]) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
      self.checks[name] = {"ok": False, "error": f"shape {ours.shape} != reference {ref.shape}"}
      return
    wide = np.float64 if ref.dtype == np.float64 else np.float32
    diff = np.abs(ours.astype(np.float64) - ref.astype(wide).astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    bound = tol[0] + tol[1] * scale
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
    self.checks[name] = {"max_abs": max_abs, "max_rel": max_rel, "tol": bound,
                         "ok": bool(max_abs <= bound)}

  @property
  def ok(self) -> bool:
    return bool(self.checks) and all(c["ok"] for c in self.checks.values())


def _nhwc(a: np.ndarray) -> np.ndarray:
  """[..., C, H, W] -> [..., H, W, C] for the fixtures' *_nchw arrays."""
  return np.moveaxis(np.asarray(a), -3, -1)


def _image(z: Any, stem: str) -> np.ndarray:
  return np.asarray(z[f"{stem}_nhwc"]) if f"{stem}_nhwc" in z.files else _nhwc(z[f"{stem}_nchw"])


def _maybe(r: Report, z: Any, key: str, ours: Any, tol: tuple[float, float]) -> None:
  """Compares when the fixture has `key`; `ours` may be a thunk (computed only then).

  *_nchw references are moved to NHWC and the check is named without the suffix.
  """
  if key in z.files:
    ref = _nhwc(z[key]) if key.endswith("_nchw") else z[key]
    r.add(key.removesuffix("_nchw"), ours() if callable(ours) else ours, ref, tol)


def _config_json(z: Any) -> dict:
  return json.loads(str(z["config_json"])) if "config_json" in z.files else {}


# ----------------------------------------------------------------- jitted model calls


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(config: unet.ModelConfig, method: str | None, params: Any, *args: Any) -> Any:
  """One compiled eval-mode model call per (config, method, shapes)."""
  return unet.JointUNet(config).apply({"params": params}, *args, train=False, method=method)


class Model:
  """Tiny model rebuilt from a weights fixture."""

  def __init__(self, w: Any) -> None:
    """`w`: the weights fixture (a `_Fixture`)."""
    self.cfg_json = _config_json(w)
    self.config = port.model_config_from_fixture_json(self.cfg_json)
    self.params = port.params_from_torch_state_dict(
        {str(k): w[str(k)] for k in w["param_keys"]}, self.config)

  def schedule(self) -> schedule.Schedule:
    return schedule.make_schedule(*_schedule_args(self.cfg_json))

  # `params` defaults to the fixture weights; the KD check passes teachers.
  def eps(self, x: Any, t: Any, params: Any = None) -> jax.Array:
    return _call(self.config, None, self.params if params is None else params, x, t)

  def classify(self, x: Any, params: Any = None) -> jax.Array:
    return _call(self.config, "classify", self.params if params is None else params, x)

  def features(self, x: Any, t: Any) -> jax.Array:
    return _call(self.config, "features", self.params, x, t)


def _find_weights(fixture: pathlib.Path, z: Any, weights: str | None) -> pathlib.Path | None:
  if "param_keys" in z.files:
    return fixture
  if weights:
    return pathlib.Path(weights)
  default = fixture.parent / DEFAULT_WEIGHTS
  if default.exists():
    return default
  for cand in sorted(fixture.parent.glob("*.npz")):
    if "param_keys" in np.load(cand, allow_pickle=False).files:
      return cand
  return None


# ----------------------------------------------------------------- unet


def check_unet(z: Any, m: Model, r: Report) -> None:
  x, t = jnp.asarray(_image(z, "x")), jnp.asarray(z["t"])
  r.add("eps", m.eps(x, t), _image(z, "eps"), MODEL_TOL)
  _maybe(r, z, "features_t0", lambda: m.features(x, jnp.zeros_like(t)), MODEL_TOL)
  _maybe(r, z, "logits_t0", lambda: m.classify(x), MODEL_TOL)
  _maybe(r, z, "features_at_t", lambda: m.features(x, t), MODEL_TOL)
  _maybe(r, z, "feature_dim", unet.feature_dim(m.config), EXACT)
  if not any(k.startswith("debug_") for k in z.files):
    return
  d = _call(m.config, "debug_activations", m.params, x, t)
  for name in ("temb_sinusoidal", "temb_mlp"):
    _maybe(r, z, f"debug_{name}", d[name], MODEL_TOL)
  for group in ("hs", "out"):
    for i, h in enumerate(d[group]):
      _maybe(r, z, f"debug_{group}_{i:02d}_nchw", h, MODEL_TOL)
  if "zero_initialised_in_original" in z.files and "param_keys" in z.files:
    # A fresh init zeroes exactly the tensors the original constructor zeroes.
    fresh = traverse_util.flatten_dict(unet.init_params(m.config, jax.random.key(0)))
    zero = {port.param_torch_key(p) for p, v in fresh.items() if not np.asarray(v).any()}
    ref = set(z["zero_initialised_in_original"].tolist())
    keys = z["param_keys"].tolist()
    r.add("zero_initialised_in_original", [k in zero for k in keys], [k in ref for k in keys],
          EXACT)


# ----------------------------------------------------------------- schedule


def _ddim_field_refs(z: Any) -> dict[int, dict[str, np.ndarray]]:
  """{S: {field: array}} for every ddim_<field>_<S> array."""
  out: dict[int, dict[str, np.ndarray]] = {}
  for key in z.files:
    match = re.fullmatch(r"ddim_(\w+)_(\d+)", key)
    if match:
      out.setdefault(int(match.group(2)), {})[match.group(1)] = np.asarray(z[key])
  return out


def _schedule_args(cfg: dict) -> tuple[int, float, float]:
  return (cfg.get("timesteps", 1000), cfg.get("linear_start", 1e-3), cfg.get("linear_end", 2e-2))


def check_schedule(z: Any, r: Report, cfg: dict) -> None:
  """`cfg`: the original DDPM config (timesteps, linear_start/end, ddim_eta)."""
  sched = schedule.make_schedule(*_schedule_args(cfg))
  for field in schedule.Schedule.__dataclass_fields__:
    if f"{field}_f32" in z.files:
      r.add(f"{field}_f32", getattr(sched, field), z[f"{field}_f32"], SCHEDULE_TOL)
  if any(k.endswith("_f64") for k in z.files):
    f64 = schedule.schedule_arrays_f64(*_schedule_args(cfg))
    for field, arr in f64.items():
      if f"{field}_f64" in z.files:
        r.add(f"{field}_f64", arr, z[f"{field}_f64"], F64_TOL)
  # The "as used" arrays are p_sample_ddim's float32 per-step constants.
  aliases = {"a_t_as_used": "alphas", "a_prev_as_used": "alphas_prev"}
  for steps, refs in sorted(_ddim_field_refs(z).items()):
    ddim = sampler.make_ddim_params(sched, steps, eta=cfg.get("ddim_eta", 0.0))
    tables = {f: getattr(ddim, f) for f in ("timesteps", "alphas", "alphas_prev", "sigmas",
                                            "sqrt_one_minus_alphas")}
    tables["sampling_order"] = np.asarray(ddim.timesteps)[::-1]
    for field, ref in refs.items():
      ours = tables.get(aliases.get(field, field))
      if ours is None:
        continue
      tol = EXACT if ref.dtype.kind in "iu" else SCHEDULE_TOL
      r.add(f"ddim_{field}_{steps}", ours, ref, tol)


# ----------------------------------------------------------------- ddim


@functools.partial(jax.jit, static_argnums=0)
def _run_ddim(config, params, x_T, ddim):
  model = unet.JointUNet(config)
  eps_fn = lambda x, t, rng: model.apply({"params": params}, x, t, train=False)
  return sampler.ddim_sample(eps_fn, x_T, ddim, jax.random.key(0), return_intermediates=True)


def check_ddim(z: Any, m: Model, r: Report) -> None:
  steps = len(z["steps_t"]) if "steps_t" in z.files else z["steps_eps_nchw"].shape[0]
  ddim = sampler.make_ddim_params(m.schedule(), steps)
  x_T = jnp.asarray(_image(z, "x_T"))
  x0, inter = _run_ddim(m.config, m.params, x_T, ddim)
  order = np.asarray(ddim.timesteps)[::-1]
  _maybe(r, z, "steps_t", order, EXACT)
  _maybe(r, z, "steps_index", np.arange(steps)[::-1], EXACT)
  for ours, stem in ((inter["eps"], "eps"), (inter["pred_x0"], "pred_x0"), (inter["x"], "x_out")):
    _maybe(r, z, f"steps_{stem}_nchw", ours, DDIM_TOL)
  _maybe(r, z, "x_after_step1_nchw", inter["x"][0], DDIM_TOL)
  _maybe(r, z, "pred_x0_step1_nchw", inter["pred_x0"][0], DDIM_TOL)
  if "samples_nhwc" in z.files or "samples_nchw" in z.files:
    r.add("samples", x0, _image(z, "samples"), DDIM_TOL)
  if "steps_eps_nchw" in z.files and "steps_x_out_nchw" in z.files:
    # Teacher-forced: the UNet on the stored input of every step isolates the
    # model from the sampler's accumulated drift.
    x_out = _nhwc(z["steps_x_out_nchw"])
    x_in = np.concatenate([np.asarray(x_T)[None], x_out[:-1]])
    t_in = np.repeat(order, x_T.shape[0]).astype(np.int32)
    eps = m.eps(jnp.asarray(x_in.reshape(-1, *x_in.shape[2:])), t_in)
    r.add("steps_eps_teacher_forced", np.asarray(eps).reshape(x_in.shape),
          _nhwc(z["steps_eps_nchw"]), MODEL_TOL)
  # Replay labelling on our own samples, end to end.
  _maybe(r, z, "replay_logits", lambda: m.classify(x0), DDIM_TOL)
  _maybe(r, z, "replay_labels", lambda: sampler.label_samples(m.classify, x0), EXACT)


# ----------------------------------------------------------------- losses


def _batch(z: Any) -> dict[str, jax.Array]:
  return {"x_diff": jnp.asarray(_image(z, "x_w")), "x_cls": jnp.asarray(_image(z, "x_s")),
          "label": jnp.asarray(z["y"], jnp.int32)}


def check_loss_inputs(z: Any, m: Model, r: Report, sched: schedule.Schedule) -> None:
  b, t = _batch(z), jnp.asarray(z["t"], jnp.int32)
  _maybe(r, z, "x_noisy_nchw", lambda: schedule.q_sample(
      sched, b["x_diff"], t, jnp.asarray(_image(z, "noise"))), MODEL_TOL)
  _maybe(r, z, "student_eps_nchw", lambda: m.eps(jnp.asarray(_image(z, "x_noisy")), t),
         MODEL_TOL)
  _maybe(r, z, "student_logits_xs_t0", lambda: m.classify(b["x_cls"]), MODEL_TOL)


# Cached so that repeated checks in one process (the tests) reuse the compiled step.
@functools.lru_cache(maxsize=None)
def _local_fn(config: unet.ModelConfig, cls_weight: float):
  return jax.jit(functools.partial(losses.local_terms, unet.JointUNet(config),
                                   cls_weight=cls_weight, train=False))


@functools.lru_cache(maxsize=None)
def _kd_fn(config: unet.ModelConfig, weights: losses.KDWeights):
  return jax.jit(functools.partial(losses.kd_terms, unet.JointUNet(config), weights=weights,
                                   teacher_train=False, train=False))


def check_local(z: Any, m: Model, r: Report, sched: schedule.Schedule) -> None:
  fn = _local_fn(m.config, m.cfg_json.get("classification_loss_scale", 1e-3))
  _, terms = fn(m.params, _batch(z), jnp.asarray(z["t"], jnp.int32),
                jnp.asarray(_image(z, "noise")), jax.random.key(0), sched)
  for key in z.files:
    if key.startswith("local_loss_") and key[len("local_loss_"):] in terms:
      r.add(key, terms[key[len("local_loss_"):]], z[key], LOSS_TOL)


def _teachers(z: Any, m: Model, seeds: dict, r: Report) -> dict[str, dict]:
  """Teacher params regenerated from the RandomState recipe, checked against the stored sums."""
  keys = [str(k) for k in z["teacher_param_keys"]]
  shapes = port.torch_param_shapes(m.config)
  out = {}
  for role in ("old", "new"):
    sd = port.teacher_state_dict_from_recipe(keys, shapes, int(seeds[role]))
    for stat, fn in (("sum", np.sum), ("abssum", lambda a: np.sum(np.abs(a)))):
      _maybe(r, z, f"teacher_{role}_param_{stat}_f64",
             lambda: [fn(sd[k].astype(np.float64)) for k in keys], F64_TOL)
    for key in z.files:
      if key.startswith(f"teacher_{role}.") and key[len(f"teacher_{role}."):] in sd:
        r.add(key, sd[key[len(f"teacher_{role}."):]], z[key], EXACT)
    out[role] = port.params_from_torch_state_dict(sd, m.config)
  return out


def _class_mask(classes: np.ndarray, num_classes: int) -> jax.Array:
  return jnp.zeros((num_classes,), bool).at[jnp.asarray(classes)].set(True)


def check_kd(z: Any, m: Model, r: Report, sched: schedule.Schedule) -> None:
  cfg = _config_json(z)
  kd, k = cfg["kd"], m.config.num_classes
  teachers = _teachers(z, m, cfg["teacher_seeds"], r)
  weights = losses.KDWeights(simple=kd["l_simple_weight"], ce=kd["classification_loss_scale"],
                             kd=kd["kd_loss_weight"], cls_kd=kd["kl_classification_weight"])
  old_k = _class_mask(z["old_classes"] if "old_classes" in z.files else kd["old_classes"], k)
  new_k = _class_mask(z["new_classes"] if "new_classes" in z.files else kd["new_classes"], k)
  fn = _kd_fn(m.config, weights)
  t, b = jnp.asarray(z["t"], jnp.int32), _batch(z)
  _, terms = fn(m.params, teachers["old"], teachers["new"], b, t,
                jnp.asarray(_image(z, "noise")), jax.random.key(0), sched,
                new_class_mask_K=new_k, old_class_mask_K=old_k,
                cls_active=float(kd.get("classification_start", 0) <= 0))
  for key in z.files:
    # kd_loss_total -> total, kd_term_ce_weighted -> ce_weighted, kd_cls_softce_old -> softce_old
    name = re.sub(r"^kd_(loss_|term_|cls_)?", "", key)
    if key.startswith("kd_") and name in terms:
      r.add(key, terms[name], z[key], LOSS_TOL)
  masks = {"old": old_k[b["label"]], "new": new_k[b["label"]]}
  for role in ("old", "new"):
    _maybe(r, z, f"kd_{role}_mask", masks[role], EXACT)
  _check_teacher_outputs(z, m, teachers, masks, r)


def _check_teacher_outputs(z: Any, m: Model, teachers: dict, masks: dict, r: Report) -> None:
  # Run on the full batch and select afterwards: samples are independent in
  # eval mode, and one batch shape means no extra compiles.
  x_noisy, x_s = jnp.asarray(_image(z, "x_noisy")), jnp.asarray(_image(z, "x_s"))
  t = jnp.asarray(z["t"], jnp.int32)
  for role, params in teachers.items():
    sel = np.asarray(masks[role])
    _maybe(r, z, f"teacher_{role}_eps_on_{role}_mask_nchw",
           lambda: np.asarray(m.eps(x_noisy, t, params))[sel], MODEL_TOL)
    logits = np.asarray(m.classify(x_s, params))
    _maybe(r, z, f"teacher_{role}_logits_on_{role}_mask", logits[sel], MODEL_TOL)
    _maybe(r, z, f"teacher_{role}_probs_on_{role}_mask",
           np.asarray(jax.nn.softmax(logits, axis=-1))[sel], MODEL_TOL)


def check_losses(z: Any, m: Model, r: Report) -> None:
  sched = m.schedule()
  check_loss_inputs(z, m, r, sched)
  if any(k.startswith("local_") for k in z.files):
    check_local(z, m, r, sched)
  if any(k.startswith("kd_") for k in z.files) and "kd" in _config_json(z):
    check_kd(z, m, r, sched)


# ----------------------------------------------------------------- CLI


class _Fixture:
  """An npz that remembers which arrays were read, to report the unread ones."""

  def __init__(self, path: pathlib.Path) -> None:
    self._z = np.load(path, allow_pickle=False)
    self.files = list(self._z.files)
    self.read: set[str] = set()

  def __getitem__(self, key: str) -> np.ndarray:
    self.read.add(key)
    return self._z[key]


def _kinds(files: Sequence[str]) -> list[str]:
  kinds = []
  if "eps_nhwc" in files or "eps_nchw" in files:
    kinds.append("unet")
  if any(f.endswith("_f32") or re.fullmatch(r"ddim_\w+_\d+", f) for f in files):
    kinds.append("schedule")
  if {"x_T_nhwc", "x_T_nchw"} & set(files) and {"steps_t", "steps_eps_nchw"} & set(files):
    kinds.append("ddim")
  if any(f.startswith(("local_", "kd_")) for f in files):
    kinds.append("losses")
  return kinds


def run(fixture: pathlib.Path, weights: str | None = None) -> dict[str, Any]:
  """All checks of one fixture; returns the JSON-able result."""
  z = _Fixture(fixture)
  kinds, r = _kinds(z.files), Report()
  result: dict[str, Any] = {"fixture": str(fixture), "kinds": kinds}
  needs_model = [k for k in kinds if k != "schedule"]
  model = None
  if needs_model:
    path = _find_weights(fixture, z, weights)
    if path is None:
      return {**result, "ok": False, "error": f"{'/'.join(needs_model)} checks need the tiny "
              f"model weights: pass --weights or put {DEFAULT_WEIGHTS} next to the fixture"}
    model = Model(z if path == fixture else _Fixture(path))
    result["weights"] = str(path)
  with jax.default_matmul_precision("highest"):
    if "unet" in kinds:
      check_unet(z, model, r)
    if "schedule" in kinds:
      # A schedule fixture carries its DDPM config; a DDIM fixture's table copies
      # belong to the model whose weights it uses.
      cfg = _config_json(z)
      check_schedule(z, r, cfg if "timesteps" in cfg or model is None else model.cfg_json)
    if "ddim" in kinds:
      check_ddim(z, model, r)
    if "losses" in kinds:
      check_losses(z, model, r)
  if not r.checks:
    return {**result, "ok": False, "error": "no checkable arrays in fixture"}
  failed = sorted(k for k, c in r.checks.items() if not c["ok"])
  # Arrays nothing looked at (an NCHW copy counts as read when its NHWC twin was).
  unread = sorted(k for k in set(z.files) - z.read
                  if not (k.endswith("_nchw") and k[:-5] + "_nhwc" in z.read))
  return {**result, "ok": r.ok, "num_checks": len(r.checks), "failed": failed,
          "unread": unread, "checks": r.checks}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("fixture", type=pathlib.Path)
  parser.add_argument("--weights", help="npz with the tiny model weights (unet fixture)")
  args = parser.parse_args(argv)
  try:
    result = run(args.fixture, args.weights)
  except Exception as e:  # noqa: BLE001 -- a crash must not read as a tolerance failure (1)
    traceback.print_exc()
    result = {"fixture": str(args.fixture), "ok": False, "error": f"{type(e).__name__}: {e}"}
  print(json.dumps(result, sort_keys=False))
  if "error" in result:
    return 2
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
