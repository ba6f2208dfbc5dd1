"""Linear-beta DDPM schedule (ldm `sqrt_linear`), computed in float64, stored in float32.

The schedule is built once on the host with numpy (float64, exactly as ldm's
`DDPM.register_schedule`) and then cast to float32; the cast values are what
the original model registers as buffers, so every table here is bit-identical
to the PyTorch reference (see `schedule_golden.npz`). A float32 recomputation
would drift by up to ~2e-7 in alphas_cumprod.
"""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def torch_linspace_f64(start: float, end: float, num: int) -> np.ndarray:
  """`torch.linspace(start, end, num, dtype=float64)` bit for bit.

  torch's CPU kernel fills the first half as start + step*i and the second half
  as end - step*(num-1-i), and the compiled kernel contracts each to a single
  fused multiply-add. `numpy.linspace` differs by 1 ulp in 373 of the 1000
  betas (the float32 casts agree either way, but the float64 tables would not).
  Python 3.11 has no `math.fma`, so the fused op is evaluated exactly with
  Fractions and rounded once (float(Fraction) rounds correctly).
  """
  if num == 1:
    return np.array([start], np.float64)
  step = (end - start) / (num - 1)
  halfway = num // 2
  fs, fe, fstep = (fractions.Fraction(v) for v in (start, end, step))
  out = [float(fs + fstep * i) if i < halfway else float(fe - fstep * (num - 1 - i))
         for i in range(num)]
  return np.asarray(out, np.float64)


def schedule_arrays_f64(num_timesteps: int = 1000, beta_start: float = 1e-3,
                        beta_end: float = 2e-2) -> dict[str, np.ndarray]:
  """The float64 numpy tables of ldm `register_schedule` (v_posterior = 0)."""
  betas = torch_linspace_f64(beta_start, beta_end, num_timesteps)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas, axis=0)
  ac_prev = np.append(1.0, ac[:-1])
  posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
  return dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      log_one_minus_alphas_cumprod=np.log(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=posterior_variance,
      # posterior_variance[0] == 0; ldm clips before the log.
      posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
  )


class Schedule(struct.PyTreeNode):
  """float32 schedule tables, each of shape [T]; a pytree so it can be a jit argument."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  # VLB weights for eps-parameterization; only logged (original_elbo_weight = 0).
  lvlb_weights: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def _lvlb_weights_f32(f64: dict[str, np.ndarray]) -> np.ndarray:
  # ldm computes these from the float32 buffers with float32 torch ops; numpy
  # float32 elementwise ops round identically.
  b, pv = f64["betas"].astype(np.float32), f64["posterior_variance"].astype(np.float32)
  a, ac = f64["alphas"].astype(np.float32), f64["alphas_cumprod"].astype(np.float32)
  with np.errstate(divide="ignore"):  # pv[0] == 0; entry 0 is overwritten below.
    w = b**2 / (np.float32(2) * pv * a * (np.float32(1) - ac))
  w[0] = w[1]
  return w


def make_schedule(num_timesteps: int = 1000, beta_start: float = 1e-3,
                  beta_end: float = 2e-2) -> Schedule:
  """Linear betas in float64 (torch.linspace semantics), every table cast to float32."""
  f64 = schedule_arrays_f64(num_timesteps, beta_start, beta_end)
  fields = {k: jnp.asarray(f64[k].astype(np.float32))
            for k in Schedule.__dataclass_fields__ if k != "lvlb_weights"}
  return Schedule(lvlb_weights=jnp.asarray(_lvlb_weights_f32(f64)), **fields)


def _per_sample(table_T: jax.Array, t_B: jax.Array, ndim: int) -> jax.Array:
  """table[t] reshaped to [B, 1, ..., 1] for broadcasting against a rank-`ndim` batch."""
  return table_T[t_B].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with t an int array of shape [B]."""
  return (_per_sample(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _per_sample(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
  """t ~ Uniform{0, ..., T-1}, independently per sample (int32 [batch])."""
  return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
