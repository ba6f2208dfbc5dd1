"""DDIM and DDPM ancestral samplers, each one `jax.lax.scan` program, plus replay labelling.

Both samplers take an `eps_fn(x_BHWC, t_B, rng) -> eps_BHWC` callback that closes
over the model and its parameters; `rng` is the per-step dropout key (ignore it
for eval-mode sampling). Per-step keys are `fold_in(rng, i)` with i the position
in the sampling loop (0 = the noisiest step), so resuming or re-running a
sampler never depends on a carried key.

The DDIM tables reproduce ldm's `DDIMSampler.make_schedule` exactly:
- timesteps range(0, T, T // S) + 1 (uniform discretisation, shifted by one);
- alphas_prev[0] = alphas_cumprod[0] (= 1 - 1e-3), not 1 (ldm quirk, kept);
- sqrt(1 - alphas) computed in float32 from the float32 alphas, which differs
  from the schedule's float64-derived table by up to 2.8e-7;
- sigmas computed in float64 from those float32 values, then cast to float32
  (`p_sample_ddim` builds its per-step constants with torch.full in float32).
All per-step arithmetic is float32, in ldm's operation order.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdcl_jax.diffusion.schedule import Schedule

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]


class DDIMParams(struct.PyTreeNode):
  """DDIM tables in ascending-timestep order (index i = 0 is the last sampling step)."""
  timesteps: jax.Array              # int32 [S]
  alphas: jax.Array                 # f32 [S]  abar at timesteps
  alphas_prev: jax.Array            # f32 [S]  abar at the previous listed timestep
  sigmas: jax.Array                 # f32 [S]  eta * ldm sigma
  sqrt_one_minus_alphas: jax.Array  # f32 [S]
  # Static: eta == 0 lets the sampler skip the per-step noise draw entirely.
  eta: float = struct.field(pytree_node=False, default=0.0)

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """ldm 'uniform' discretisation: range(0, T, T // S) + 1."""
  c = num_timesteps // num_steps
  ts = np.asarray(list(range(0, num_timesteps, c)), np.int64) + 1
  if ts.shape[0] != num_steps:
    # e.g. T=1000, S=300 yields 334 steps in ldm; refuse rather than silently differ.
    raise ValueError(f"{num_steps} DDIM steps do not divide {num_timesteps} evenly "
                     f"(ldm would run {ts.shape[0]} steps)")
  return ts


def make_ddim_params(sched: Schedule, num_steps: int, eta: float = 0.0) -> DDIMParams:
  """Host-side DDIM tables (numpy, ldm `make_ddim_sampling_parameters` semantics)."""
  ac = np.asarray(sched.alphas_cumprod, np.float32)
  ts = ddim_timesteps(ac.shape[0], num_steps)
  alphas = ac[ts]
  alphas_prev = np.concatenate([ac[:1], ac[ts[:-1]]]).astype(np.float64)
  a64 = alphas.astype(np.float64)
  sigmas = eta * np.sqrt((1.0 - alphas_prev) / (1.0 - a64) * (1.0 - a64 / alphas_prev))
  return DDIMParams(
      timesteps=jnp.asarray(ts, jnp.int32),
      alphas=jnp.asarray(alphas),
      alphas_prev=jnp.asarray(alphas_prev.astype(np.float32)),
      sigmas=jnp.asarray(sigmas.astype(np.float32)),
      sqrt_one_minus_alphas=jnp.asarray(np.sqrt(np.float32(1.0) - alphas)),
      eta=float(eta))


def _step_keys(rng: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dropout key for eps_fn, noise key) of sampling-loop position i."""
  k_eps, k_noise = jax.random.split(jax.random.fold_in(rng, i))
  return k_eps, k_noise


def _ddim_update(x, e, a_t, a_prev, sigma_t, sqrt_1m_a_t, noise, clip_x0):
  """One `p_sample_ddim` update given eps; returns (x_prev, pred_x0)."""
  pred_x0 = (x - sqrt_1m_a_t * e) / jnp.sqrt(a_t)
  if clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  # Clamped at 0 because f32 rounding can make 1 - a_prev - sigma^2 slightly
  # negative when eta is close to 1; it is a no-op for every value ldm accepts.
  dir_xt = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma_t**2, 0.0)) * e
  x_prev = jnp.sqrt(a_prev) * pred_x0 + dir_xt
  if noise is not None:
    x_prev = x_prev + sigma_t * noise
  return x_prev, pred_x0


def ddim_sample(eps_fn: EpsFn, x_T: jax.Array, ddim: DDIMParams, rng: jax.Array, *,
                eta: float | None = None, clip_x0: bool = False,
                return_intermediates: bool = False,
                ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """Deterministic (eta = 0) or stochastic DDIM from x_T, as one lax.scan.

  Args:
    eps_fn: eps_fn(x, t_B, rng) -> eps.
    x_T: initial noise [B, ...].
    ddim: tables from `make_ddim_params`; they also fix eta (single source of truth).
    rng: base key; step i uses split(fold_in(rng, i)) for (dropout, noise).
    eta: optional check only; must equal `ddim.eta` if given.
    clip_x0: clip the x0 prediction to [-1, 1] (the replay does not).
    return_intermediates: also return {"x", "pred_x0", "eps"} stacked per step
      [S, B, ...] in sampling order (memory heavy; for tests and debugging).

  Returns:
    x0 [B, ...], or (x0, intermediates) when return_intermediates.
  """
  if eta is not None and float(eta) != ddim.eta:
    raise ValueError(f"eta={eta} but the DDIM tables were built with eta={ddim.eta}")
  stochastic = ddim.eta != 0.0
  batch = x_T.shape[0]
  # Reverse the ascending tables into sampling order (noisiest step first).
  xs = (jnp.arange(ddim.num_steps), *(a[::-1] for a in (
      ddim.timesteps, ddim.alphas, ddim.alphas_prev, ddim.sigmas, ddim.sqrt_one_minus_alphas)))

  def body(x, step):
    i, t, a_t, a_prev, sigma_t, sqrt_1m = step
    k_eps, k_noise = _step_keys(rng, i)
    e = eps_fn(x, jnp.full((batch,), t, jnp.int32), k_eps)
    noise = jax.random.normal(k_noise, x.shape, x.dtype) if stochastic else None
    x_prev, pred_x0 = _ddim_update(x, e, a_t, a_prev, sigma_t, sqrt_1m, noise, clip_x0)
    return x_prev, ((x_prev, pred_x0, e) if return_intermediates else None)

  x0, ys = jax.lax.scan(body, x_T, xs)
  if return_intermediates:
    return x0, dict(zip(("x", "pred_x0", "eps"), ys))
  return x0


def ddim_sample_reference(eps_fn: EpsFn, x_T: jax.Array, ddim: DDIMParams, rng: jax.Array, *,
                          clip_x0: bool = False) -> jax.Array:
  """Python-loop DDIM written as ldm's `ddim_sampling` loop; used only to test `ddim_sample`."""
  total = ddim.num_steps
  time_range = np.flip(np.asarray(ddim.timesteps))
  x = x_T
  for i, step in enumerate(time_range):
    index = total - i - 1
    k_eps, k_noise = jax.random.split(jax.random.fold_in(rng, i))
    e = eps_fn(x, jnp.full((x.shape[0],), int(step), jnp.int32), k_eps)
    a_t, a_prev = ddim.alphas[index], ddim.alphas_prev[index]
    sigma_t, sqrt_1m = ddim.sigmas[index], ddim.sqrt_one_minus_alphas[index]
    pred_x0 = (x - sqrt_1m * e) / jnp.sqrt(a_t)
    if clip_x0:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    dir_xt = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma_t**2, 0.0)) * e
    x = jnp.sqrt(a_prev) * pred_x0 + dir_xt
    if ddim.eta != 0.0:
      x = x + sigma_t * jax.random.normal(k_noise, x.shape, x.dtype)
  return x


def ddpm_sample(eps_fn: EpsFn, x_T: jax.Array, sched: Schedule, rng: jax.Array, *,
                clip_x0: bool = True) -> jax.Array:
  """Ancestral DDPM over all T steps (ldm `p_sample_loop`), as one lax.scan.

  x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, optionally clipped to
  [-1, 1]; x_{t-1} = coef1 x0_hat + coef2 x_t + exp(0.5 log var) z, no noise at t = 0.
  """
  num_t = sched.num_timesteps
  batch = x_T.shape[0]
  bshape = (batch,) + (1,) * (x_T.ndim - 1)

  def body(x, i):
    t = num_t - 1 - i
    k_eps, k_noise = _step_keys(rng, i)
    e = eps_fn(x, jnp.full((batch,), t, jnp.int32), k_eps)
    x0 = sched.sqrt_recip_alphas_cumprod[t] * x - sched.sqrt_recipm1_alphas_cumprod[t] * e
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    mean = sched.posterior_mean_coef1[t] * x0 + sched.posterior_mean_coef2[t] * x
    std = jnp.exp(0.5 * sched.posterior_log_variance_clipped[t])
    nonzero = jnp.broadcast_to((t != 0).astype(x.dtype), bshape)
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    return mean + nonzero * std * noise, None

  x0, _ = jax.lax.scan(body, x_T, jnp.arange(num_t))
  return x0


def label_samples(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
  """Hard replay labels: argmax of the classifier logits (int32 [B])."""
  return jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)
