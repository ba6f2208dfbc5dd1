"""Generative replay with exact per-class quotas (spec 4.4 step 2).

A generator draws unconditional samples (DDIM by default, one `lax.scan` program) and labels them
with its own classifier at t = 0. Samples are kept per class until each class reaches its quota, or
until `max_generated_factor * quota * classes` images have been drawn. Remaining deficits are
filled with flipped/cropped (or repeated) copies of kept samples. Unlike the original, the fill
always terminates: a class that received no sample at all is filled with the generated images its
logit ranked highest (spec 8.1.5).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jdcl_jax import sharding
from jdcl_jax.data import augment
from jdcl_jax.diffusion import sampler

PyTree = Any


def _generate(sample_params: PyTree, label_params: PyTree, rng: jax.Array, *, model: Any,
              sched: Any, cfg: ml_collections.ConfigDict, shape: tuple[int, ...]
              ) -> tuple[jax.Array, jax.Array]:
  """x_T -> sampler -> (uint8 images, classifier logits on the float samples)."""
  k_x, k_s, k_l = jax.random.split(rng, 3)
  x_T = jax.random.normal(k_x, shape, jnp.float32)

  def eps_fn(x, t, r):
    return model.apply({"params": sample_params}, x, t, train=cfg.sampler_dropout,
                       rngs={"dropout": r})

  if cfg.sampler == "ddim":
    ddim = sampler.make_ddim_params(sched, cfg.ddim_steps, eta=cfg.eta)
    x0 = sampler.ddim_sample(eps_fn, x_T, ddim, k_s, eta=cfg.eta, clip_x0=cfg.clip_x0)
  elif cfg.sampler == "ddpm":
    x0 = sampler.ddpm_sample(eps_fn, x_T, sched, k_s, clip_x0=cfg.clip_x0)
  else:
    raise ValueError(f"unknown replay.sampler {cfg.sampler!r}; expected ddim|ddpm")
  # Labels come from the generator's classifier on the float samples, as the original does.
  logits = model.apply({"params": label_params}, x0, train=cfg.label_dropout,
                       rngs={"dropout": k_l}, method=type(model).classify)
  x01 = jnp.clip(x0 * 0.5 + 0.5, 0.0, 1.0)
  # ToPILImage truncates: uint8 = floor(255 x). Without quantization we still round to store uint8.
  u8 = jnp.floor(255.0 * x01) if cfg.quantize_uint8 else jnp.round(255.0 * x01)
  return u8.astype(jnp.uint8), logits


def make_generate_fn(model: Any, sched: Any, cfg: ml_collections.ConfigDict,
                     image_shape: Sequence[int], mesh: jax.sharding.Mesh) -> Callable:
  """jit once per (batch shape, steps); the batch is split over the data axis."""
  bs = cfg.sample_batch_size
  sharding.check_batch_divisible(bs, mesh, "replay.sample_batch_size")
  fn = functools.partial(_generate, model=model, sched=sched, cfg=cfg,
                         shape=(bs, *image_shape))
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(fn, in_shardings=(repl, repl, repl), out_shardings=(data, data))


def _fill_copies(rng: np.random.Generator, pool: np.ndarray, n: int,
                 cfg: ml_collections.ConfigDict, scale: tuple[float, float],
                 key: jax.Array) -> np.ndarray:
  """n copies of random pool images: flip + RandomResizedCrop (original) or plain repeats."""
  picks = pool[rng.integers(0, len(pool), size=n)]
  if cfg.fill == "repeat":
    return picks
  if cfg.fill != "augment":
    raise ValueError(f"unknown replay.fill {cfg.fill!r}; expected augment|repeat")
  x = augment.diffusion_view(key, jnp.asarray(picks), scale=tuple(scale), flip=True)
  return np.asarray(jnp.round((x + 1.0) * 127.5)).clip(0, 255).astype(np.uint8)


def generate_class_set(generate_fn: Callable, sample_params: PyTree, label_params: PyTree,
                       classes: Sequence[int], quota: int, rng: jax.Array,
                       cfg: ml_collections.ConfigDict, fill_scale: tuple[float, float]
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Exactly `quota` images for each class in `classes`, labelled by the generator."""
  classes = [int(c) for c in classes]
  kept: dict[int, list[np.ndarray]] = {c: [] for c in classes}
  best: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # fallback pool: top logits per class
  cap = int(np.ceil(cfg.max_generated_factor * quota * len(classes)))
  generated, rounds, label_hist = 0, 0, None
  while generated < cap and any(sum(map(len, kept[c])) < quota for c in classes):
    # Each device samples its share of the batch; every process gathers the whole batch so all
    # hosts make the same keep/fill decisions and hold the same replay set.
    imgs, logits = multihost_utils.process_allgather(
        generate_fn(sample_params, label_params, jax.random.fold_in(rng, rounds)), tiled=True)
    labels = logits.argmax(-1)
    rounds, generated = rounds + 1, generated + len(labels)
    hist = np.bincount(labels, minlength=logits.shape[-1])
    label_hist = hist if label_hist is None else label_hist + hist
    for c in classes:
      need = quota - sum(map(len, kept[c]))
      if need > 0:
        kept[c].append(imgs[labels == c][:need])
      best[c] = _top_by_logit(best.get(c), imgs, logits[:, c], quota)
  xs, stats = [], {"generated": generated, "rounds": rounds, "cap_reached": generated >= cap,
                   "label_histogram": label_hist.tolist(), "kept": {}, "filled": {}}
  np_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  for i, c in enumerate(classes):
    have = np.concatenate(kept[c]) if kept[c] else np.zeros((0,) + imgs.shape[1:], np.uint8)
    stats["kept"][c], stats["filled"][c] = len(have), quota - len(have)
    if len(have) < quota:
      pool = have if len(have) else best[c][0]   # no sample at all: highest-ranked images
      fill = _fill_copies(np_rng, pool, quota - len(have), cfg, fill_scale,
                          jax.random.fold_in(rng, 10_000 + i))
      have = np.concatenate([have, fill])
    xs.append(have)
  x = np.concatenate(xs)
  y = np.repeat(np.asarray(classes, np.int32), quota)
  return x, y, stats


def _top_by_logit(prev: Any, imgs: np.ndarray, scores: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
  """Keep the k images with the highest score for one class (running over rounds)."""
  if prev is not None:
    imgs, scores = np.concatenate([prev[0], imgs]), np.concatenate([prev[1], scores])
  order = np.argsort(-scores, kind="stable")[:k]
  return imgs[order], scores[order]
