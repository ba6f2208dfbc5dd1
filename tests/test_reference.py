"""Golden PyTorch fixtures (shared/reference): the ported tiny model and the checker CLI.

The fixtures live beside the repository (`../shared/reference`) or wherever
JDCL_REFERENCE_DIR points; every test here is skipped when they are absent.
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdcl_jax.models import port, unet
from jdcl_jax.tools import check_reference

REPO = pathlib.Path(__file__).parents[1]
REFERENCE_DIR = pathlib.Path(os.environ.get(
    "JDCL_REFERENCE_DIR", pathlib.Path(__file__).parents[2] / "shared" / "reference"))
UNET_NPZ = REFERENCE_DIR / "unet_tiny_golden.npz"

pytestmark = pytest.mark.skipif(
    not UNET_NPZ.exists(),
    reason=f"golden fixtures not found in {REFERENCE_DIR} (set JDCL_REFERENCE_DIR)")

ATOL = 1e-5   # reference README section 7; the measured error is ~3e-6


@pytest.fixture(scope="module")
def golden():
  return np.load(UNET_NPZ, allow_pickle=False)


@pytest.fixture(scope="module")
def ported(golden):
  config = port.model_config_from_fixture_json(json.loads(str(golden["config_json"])))
  sd = {str(k): golden[str(k)] for k in golden["param_keys"]}
  return config, port.params_from_torch_state_dict(sd, config)


def _nhwc(a):
  return np.moveaxis(np.asarray(a), -3, -1)


def test_fixture_config_is_the_tiny_config(ported):
  assert ported[0] == unet.tiny_model_config()


def test_original_keys_and_shapes(golden):
  """Our tree maps one-to-one onto the original 248 keys, shapes included."""
  ours = port.torch_param_shapes(unet.tiny_model_config())
  theirs = {str(k): golden[str(k)].shape for k in golden["param_keys"]}
  assert ours == theirs


def test_full_cifar10_keys_and_shapes():
  """The full CIFAR-10 model against the original state_dict listing (no allocation)."""
  listing = REFERENCE_DIR / "cifar10_state_dict_shapes.txt"
  if not listing.exists():
    pytest.skip(f"{listing} absent")
  theirs = {}
  for line in listing.read_text().splitlines():
    if line.startswith("param\t"):
      _, key, shape = line.split("\t")[:3]
      theirs[key] = tuple(ast.literal_eval(shape))
  assert port.torch_param_shapes(unet.cifar10_model_config()) == theirs


def test_golden_unet_outputs(golden, ported):
  config, params = ported
  model = unet.JointUNet(config)
  x, t = jnp.asarray(golden["x_nhwc"]), jnp.asarray(golden["t"])
  apply = lambda *a, **kw: model.apply({"params": params}, *a, train=False, **kw)
  with jax.default_matmul_precision("highest"):
    eps = apply(x, t)
    logits = apply(x, method="classify")
    feats0 = apply(x, jnp.zeros(4), method="features")
    feats_t = apply(x, t, method="features")
    debug = apply(x, t, method="debug_activations")
  np.testing.assert_allclose(eps, golden["eps_nhwc"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(logits, golden["logits_t0"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(feats0, golden["features_t0"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(feats_t, golden["features_at_t"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(debug["temb_sinusoidal"], golden["debug_temb_sinusoidal"],
                             atol=ATOL)
  for i, h in enumerate(debug["hs"]):
    np.testing.assert_allclose(h, _nhwc(golden[f"debug_hs_{i:02d}_nchw"]), atol=ATOL, rtol=ATOL)
  for i, h in enumerate(debug["out"]):
    np.testing.assert_allclose(h, _nhwc(golden[f"debug_out_{i:02d}_nchw"]), atol=ATOL, rtol=ATOL)


def test_zero_init_matches_original(golden):
  """Exactly the 89 tensors the original constructor zeroes are zero in a fresh init."""
  params = unet.init_params(unet.tiny_model_config(), jax.random.key(3))
  flat = traverse_util.flatten_dict(params)
  zero = {port.param_torch_key(p) for p, v in flat.items() if not np.asarray(v).any()}
  assert zero == {str(k) for k in golden["zero_initialised_in_original"]}


def test_teacher_recipe_reproduces_stored_sums(golden):
  z = np.load(REFERENCE_DIR / "losses_golden.npz", allow_pickle=False)
  keys = [str(k) for k in z["teacher_param_keys"]]
  shapes = {k: golden[k].shape for k in keys}
  cfg = json.loads(str(z["config_json"]))
  for role in ("old", "new"):
    sd = port.teacher_state_dict_from_recipe(keys, shapes, cfg["teacher_seeds"][role])
    sums = np.array([sd[k].astype(np.float64).sum() for k in keys])
    np.testing.assert_array_equal(sums, z[f"teacher_{role}_param_sum_f64"])
    np.testing.assert_array_equal(sd["classifier.3.weight"],
                                  z[f"teacher_{role}.classifier.3.weight"])


# ----------------------------------------------------------------- checker CLI


def _run_cli(capsys, *argv):
  code = check_reference.main([str(a) for a in argv])
  return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name, kinds", [
    ("unet_tiny_golden.npz", ["unet"]),
    ("schedule_golden.npz", ["schedule"]),
    ("ddim_tiny_golden.npz", ["schedule", "ddim"]),
    ("losses_golden.npz", ["losses"]),
])
def test_cli_passes_on_real_fixtures(capsys, name, kinds):
  code, out = _run_cli(capsys, REFERENCE_DIR / name)
  assert code == 0, out.get("failed") or out
  assert out["kinds"] == kinds and out["ok"] and not out["failed"]


def _copy_with(src: pathlib.Path, dst: pathlib.Path, **changes) -> pathlib.Path:
  z = np.load(src, allow_pickle=False)
  arrays = {k: z[k] for k in z.files}
  arrays.update(changes)
  np.savez(dst, **arrays)
  return dst


def test_cli_fails_on_perturbed_unet_fixture(capsys, tmp_path, golden):
  eps = golden["eps_nhwc"].copy()
  eps[0, 0, 0, 0] += 1e-3
  code, out = _run_cli(capsys, _copy_with(UNET_NPZ, tmp_path / "u.npz", eps_nhwc=eps))
  assert code == 1 and out["failed"] == ["eps"]


def test_cli_ddim_needs_weights(capsys, tmp_path):
  """A weightless DDIM fixture alone is an error (2); --weights fixes it; a perturbed
  sample then fails (1)."""
  src = REFERENCE_DIR / "ddim_tiny_golden.npz"
  z = np.load(src, allow_pickle=False)
  samples = z["samples_nhwc"].copy()
  samples[1, 2, 3, 0] += 0.05      # ~1.6e-4 of max|x|: well above the 1e-5 relative bound
  alone = _copy_with(src, tmp_path / "d.npz", samples_nhwc=samples)
  code, out = _run_cli(capsys, alone)
  assert code == 2 and "weights" in out["error"]
  code, out = _run_cli(capsys, alone, "--weights", UNET_NPZ)
  assert code == 1 and out["failed"] == ["samples"]


def test_cli_module_entry_point(tmp_path):
  """`python -m jdcl_jax.tools.check_reference` exit codes (schedule: no model, fast)."""
  src = REFERENCE_DIR / "schedule_golden.npz"
  bad = _copy_with(src, tmp_path / "s.npz",
                   betas_f32=np.load(src)["betas_f32"] * np.float32(1.0001))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "-m", "jdcl_jax.tools.check_reference"]
  good = subprocess.run(cmd + [str(src)], env=env, capture_output=True, text=True)
  assert good.returncode == 0, good.stderr
  assert len(good.stdout.strip().splitlines()) == 1 and json.loads(good.stdout)["ok"]
  fail = subprocess.run(cmd + [str(bad)], env=env, capture_output=True, text=True)
  assert fail.returncode == 1 and json.loads(fail.stdout)["failed"] == ["betas_f32"]
