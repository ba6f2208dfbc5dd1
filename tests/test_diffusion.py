"""Schedule and samplers: exactness against the PyTorch fixtures, scan == loop, no retrace.

Golden files live in shared/reference (or $JDCL_REFERENCE_DIR); tests that need
them are skipped when absent. To update a tolerance, re-derive it from the
float32 noise floor in reference/README.md section 7, not from a failing run.
"""
import json
import os
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.diffusion import sampler, schedule

REF_DIR = Path(os.environ.get("JDCL_REFERENCE_DIR",
                              Path(__file__).resolve().parents[2] / "shared" / "reference"))
NCHW_TO_NHWC = (0, 2, 3, 1)


def _load(name):
  path = REF_DIR / name
  if not path.exists():
    pytest.skip(f"golden fixture {path} not found")
  return np.load(path, allow_pickle=False)


@pytest.fixture(scope="module")
def sched_ref():
  return _load("schedule_golden.npz")


@pytest.fixture(scope="module")
def sched():
  return schedule.make_schedule()


# ------------------------------------------------------------------ schedule


F32_FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
              "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
              "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
              "lvlb_weights")


@pytest.mark.parametrize("field", F32_FIELDS)
def test_schedule_f32_bit_exact(sched, sched_ref, field):
  ours = np.asarray(getattr(sched, field))
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, sched_ref[f"{field}_f32"])


def test_schedule_f64(sched_ref):
  f64 = schedule.schedule_arrays_f64()
  # betas: torch.linspace bit for bit (numpy.linspace is off by 1 ulp in 373 entries).
  np.testing.assert_array_equal(f64["betas"], sched_ref["betas_f64"])
  for name in ("alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
    np.testing.assert_allclose(f64[name], sched_ref[f"{name}_f64"], rtol=0, atol=1e-15)


def test_torch_linspace_small_cases():
  np.testing.assert_array_equal(schedule.torch_linspace_f64(0.0, 1.0, 5),
                                [0.0, 0.25, 0.5, 0.75, 1.0])
  assert schedule.torch_linspace_f64(2.0, 3.0, 1).tolist() == [2.0]


def test_schedule_is_pytree_and_jit_arg(sched):
  leaves = jax.tree_util.tree_leaves(sched)
  assert len(leaves) == len(F32_FIELDS) and sched.num_timesteps == 1000
  out = jax.jit(lambda s: s.betas[3])(sched)
  assert out == sched.betas[3]


def test_q_sample_matches_fixture(sched):
  z = _load("losses_golden.npz")
  t = jnp.asarray(z["t"], jnp.int32)
  x_noisy = jax.jit(schedule.q_sample)(sched, z["x_w_nhwc"], t, z["noise_nhwc"])
  ref = z["x_noisy_nchw"].transpose(NCHW_TO_NHWC)
  np.testing.assert_allclose(np.asarray(x_noisy), ref, rtol=0, atol=1e-6)


def test_sample_timesteps_range():
  t = schedule.sample_timesteps(jax.random.key(0), 4096, 1000)
  assert t.dtype == jnp.int32 and t.shape == (4096,)
  assert int(t.min()) >= 0 and int(t.max()) <= 999
  assert int(t.min()) < 10 and int(t.max()) > 990   # actually spans the range


# ------------------------------------------------------------------ DDIM tables


@pytest.mark.parametrize("steps", [250, 10])
def test_ddim_params_match_fixture(sched, sched_ref, steps):
  d = sampler.make_ddim_params(sched, steps)
  np.testing.assert_array_equal(np.asarray(d.timesteps), sched_ref[f"ddim_timesteps_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.timesteps)[::-1],
                                sched_ref[f"ddim_sampling_order_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.alphas), sched_ref[f"ddim_alphas_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.alphas), sched_ref[f"ddim_a_t_as_used_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.alphas_prev),
                                sched_ref[f"ddim_a_prev_as_used_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.alphas_prev, np.float64),
                                sched_ref[f"ddim_alphas_prev_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.sigmas), sched_ref[f"ddim_sigmas_{steps}"])
  np.testing.assert_array_equal(np.asarray(d.sqrt_one_minus_alphas),
                                sched_ref[f"ddim_sqrt_one_minus_alphas_{steps}"])
  assert float(d.alphas_prev[0]) == np.float32(1 - 1e-3)   # the ldm quirk: not 1


def test_ddim_sigmas_eta(sched):
  d = sampler.make_ddim_params(sched, 10, eta=0.5)
  ac = np.asarray(sched.alphas_cumprod).astype(np.float64)
  ts = np.arange(0, 1000, 100) + 1
  a, ap = ac[ts], np.concatenate([ac[:1], ac[ts[:-1]]])
  want = 0.5 * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
  np.testing.assert_array_equal(np.asarray(d.sigmas), want.astype(np.float32))
  assert d.eta == 0.5 and np.all(np.asarray(d.sigmas) > 0)


def test_ddim_uneven_steps_rejected(sched):
  with pytest.raises(ValueError, match="evenly"):
    sampler.make_ddim_params(sched, 300)


# ------------------------------------------------------------------ samplers on a fake model


class FakeDenoiser(nn.Module):
  """A few-parameter eps model with dropout, so per-step keys matter."""

  @nn.compact
  def __call__(self, x, t, *, train):
    h = nn.Conv(x.shape[-1], (3, 3))(x)
    h = h + nn.Dense(x.shape[-1])(jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 5)))[:, None, None]
    return jnp.tanh(nn.Dropout(0.2, deterministic=not train)(h))


@pytest.fixture(scope="module")
def fake():
  model = FakeDenoiser()
  x = jnp.zeros((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), train=False)["params"]

  def eps_fn(params, train):
    return lambda x, t, rng: model.apply({"params": params}, x, t, train=train,
                                         rngs={"dropout": rng})
  x_T = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  return params, eps_fn, x_T


@pytest.mark.parametrize("eta,train,clip", [(0.0, True, False), (0.7, True, True),
                                            (0.0, False, True)])
def test_ddim_scan_equals_loop(sched, fake, eta, train, clip):
  params, eps_fn, x_T = fake
  d = sampler.make_ddim_params(sched, 10, eta=eta)
  rng = jax.random.key(7)
  scan = jax.jit(lambda p, x, r: sampler.ddim_sample(eps_fn(p, train), x, d, r, clip_x0=clip))
  got = scan(params, x_T, rng)
  want = sampler.ddim_sample_reference(eps_fn(params, train), x_T, d, rng, clip_x0=clip)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_ddim_eta_positive_differs_and_depends_on_rng(sched, fake):
  params, eps_fn, x_T = fake
  f = eps_fn(params, False)
  x_det = sampler.ddim_sample(f, x_T, sampler.make_ddim_params(sched, 10), jax.random.key(0))
  d = sampler.make_ddim_params(sched, 10, eta=1.0)
  x_a = sampler.ddim_sample(f, x_T, d, jax.random.key(0))
  x_b = sampler.ddim_sample(f, x_T, d, jax.random.key(1))
  assert np.all(np.isfinite(np.asarray(x_a)))
  assert float(jnp.abs(x_a - x_det).max()) > 1e-2
  assert float(jnp.abs(x_a - x_b).max()) > 1e-2
  with pytest.raises(ValueError, match="eta"):
    sampler.ddim_sample(f, x_T, d, jax.random.key(0), eta=0.0)


def test_ddim_jit_does_not_retrace(sched, fake):
  params, eps_fn, x_T = fake

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sample(p, x, d, r):
    return sampler.ddim_sample(eps_fn(p, True), x, d, r)

  d = sampler.make_ddim_params(sched, 10)
  sample(params, x_T, d, jax.random.key(0))
  sample(jax.tree.map(lambda a: a * 1.01, params), x_T + 1.0, d, jax.random.key(1))


def _point_mass_eps(sched, x0_star):
  """The exact eps of a data distribution concentrated on x0_star."""
  def eps_fn(x, t, rng):
    del rng
    sa = sched.sqrt_alphas_cumprod[t][:, None, None, None]
    s1m = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    return (x - sa * x0_star) / s1m
  return eps_fn


def test_ddim_point_mass_keeps_the_alphas_prev_quirk(sched):
  x0_star = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  x_T = jax.random.normal(jax.random.key(3), x0_star.shape)
  out = sampler.ddim_sample(_point_mass_eps(sched, x0_star), x_T,
                            sampler.make_ddim_params(sched, 10), jax.random.key(0))
  # Deterministic DDIM keeps eps constant; the last step lands on abar_0 = 0.999, not 1.
  e0 = (x_T - sched.sqrt_alphas_cumprod[901] * x0_star) / sched.sqrt_one_minus_alphas_cumprod[901]
  want = np.sqrt(np.float32(0.999)) * x0_star + np.sqrt(np.float32(0.001)) * e0
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-4)


def test_ddpm_point_mass_recovers_x0():
  small = schedule.make_schedule(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
  x0_star = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  x_T = jax.random.normal(jax.random.key(4), x0_star.shape)
  f = jax.jit(lambda x, r: sampler.ddpm_sample(_point_mass_eps(small, x0_star), x, small, r))
  out = f(x_T, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0_star), atol=1e-4)


def test_ddpm_is_stochastic_and_clips(fake):
  params, eps_fn, x_T = fake
  small = schedule.make_schedule(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
  run = jax.jit(lambda r: sampler.ddpm_sample(eps_fn(params, False), x_T, small, r))
  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a - b).max()) > 1e-3


def test_label_samples():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
  labels = sampler.label_samples(lambda x: x, logits)
  assert labels.dtype == jnp.int32 and labels.tolist() == [1, 0]


# ------------------------------------------------------------------ golden DDIM


def test_ddim_update_rule_on_stored_eps(sched):
  """Sampler arithmetic alone: feed the stored per-step eps, compare every step."""
  z = _load("ddim_tiny_golden.npz")
  eps_steps = jnp.asarray(z["steps_eps_nchw"].transpose(0, 1, 3, 4, 2))

  def eps_fn(x, t, rng):
    del x, rng
    return eps_steps[(901 - t[0]) // 100]   # step k has t = 901 - 100 k
  x0, inter = sampler.ddim_sample(eps_fn, jnp.asarray(z["x_T_nhwc"]),
                                  sampler.make_ddim_params(sched, 10), jax.random.key(0),
                                  return_intermediates=True)
  for name, ref in (("x", "steps_x_out_nchw"), ("pred_x0", "steps_pred_x0_nchw")):
    ref = z[ref].transpose(0, 1, 3, 4, 2)
    for k in range(10):
      err = np.abs(np.asarray(inter[name][k]) - ref[k]).max() / np.abs(ref[k]).max()
      assert err <= 1e-6, (name, k, err)
  # ldm's own float32 evaluation reproduces step 1 bit for bit; XLA's fusion
  # (FMA contraction, x / s -> x * (1/s)) leaves us a few ulp away.
  ref1 = z["x_after_step1_nchw"].transpose(NCHW_TO_NHWC)
  np.testing.assert_allclose(np.asarray(inter["x"][0]), ref1, rtol=0,
                             atol=1e-6 * np.abs(ref1).max())


@pytest.fixture(scope="module")
def tiny_model():
  from jdcl_jax.models import port, unet
  z = _load("unet_tiny_golden.npz")
  config = port.model_config_from_fixture_json(json.loads(str(z["config_json"])))
  params = port.params_from_torch_state_dict({k: z[k] for k in z["param_keys"]}, config)
  return unet.JointUNet(config), params


def test_ddim_tiny_golden(sched, tiny_model):
  z = _load("ddim_tiny_golden.npz")
  model, params = tiny_model

  def eps_fn(x, t, rng):
    return model.apply({"params": params}, x, t, train=False, rngs={"dropout": rng})
  with jax.default_matmul_precision("highest"):
    run = jax.jit(lambda x: sampler.ddim_sample(eps_fn, x, sampler.make_ddim_params(sched, 10),
                                                jax.random.key(0), return_intermediates=True))
    x0, inter = run(jnp.asarray(z["x_T_nhwc"]))
    classify = jax.jit(lambda x: model.apply({"params": params}, x, train=False,
                                             method="classify"))
    logits_ref_input, logits = classify(jnp.asarray(z["samples_nhwc"])), classify(x0)
  for name, ref in (("eps", "steps_eps_nchw"), ("pred_x0", "steps_pred_x0_nchw"),
                    ("x", "steps_x_out_nchw")):
    ref = z[ref].transpose(0, 1, 3, 4, 2)
    for k in range(10):
      err = np.abs(np.asarray(inter[name][k]) - ref[k]).max() / np.abs(ref[k]).max()
      assert err <= 1e-5, (name, k, err)
  err = np.abs(np.asarray(x0) - z["samples_nhwc"]).max() / np.abs(z["samples_nhwc"]).max()
  assert err <= 1e-5, err
  np.testing.assert_allclose(np.asarray(logits_ref_input), z["replay_logits"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), z["replay_logits"], atol=1e-3)
  labels = sampler.label_samples(lambda x: logits, x0)
  np.testing.assert_array_equal(np.asarray(labels), z["replay_labels"])
