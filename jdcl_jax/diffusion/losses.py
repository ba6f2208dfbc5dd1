"""JDCL objectives as pure functions; every term is returned separately for logging.

The model is a `JointUNet` (Linen): `model.apply({'params': p}, x, t, train=...)`
is the eps pass and `method="classify"` the classifier pass at t = 0. Dropout
keys come from the `rng` argument (stream "dropout"); `train=False` disables it.

Each objective has a `*_terms` form taking explicit (t, noise), which the golden
tests drive with the PyTorch batch, and a `*_loss` wrapper that draws
t ~ U{0..T-1} and noise ~ N(0, I) from its rng. All return `(loss, terms)` with
`terms` a flat dict of float32 scalars (`terms["total"] == loss`).

Numbered terms follow JDCL_SPEC.md section 3 / 6.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jdcl_jax.diffusion.schedule import Schedule, q_sample, sample_timesteps

Params = Any
Batch = dict[str, jax.Array]
Terms = dict[str, jax.Array]


class KDWeights(NamedTuple):
  """Global-stage weights (CIFAR config: simple 0.01, ce 1e-5, kd 1.0, cls_kd 1e-3)."""
  simple: float   # beta: weight of the plain eps MSE (l_simple_weight)
  ce: float       # gamma: hard-label CE on the generated labels (classification_loss_scale)
  kd: float       # w_kd: eps distillation (kd_loss_weight); also multiplies the logit KD
  cls_kd: float   # w_cls: logit distillation (kl_classification_weight)


def _on_axis(model: nn.Module, axis_name: str | None) -> nn.Module:
  # Inside shard_map the model draws dropout masks by global example index (unet.ExampleDropout).
  return model if axis_name is None else model.clone(batch_axis=axis_name)


def eps_pass(model: nn.Module, params: Params, x: jax.Array, t: jax.Array, rng: jax.Array,
             train: bool, axis_name: str | None = None) -> jax.Array:
  """eps_theta(x, t); `rng` feeds the "dropout" stream (unused when train=False). With
  `axis_name`, x is one shard of a batch split over that shard_map axis."""
  return _on_axis(model, axis_name).apply({"params": params}, x, t, train=train,
                                          rngs={"dropout": rng})


def logits_pass(model: nn.Module, params: Params, x: jax.Array, rng: jax.Array,
                train: bool, axis_name: str | None = None) -> jax.Array:
  """Classifier logits f(x) (encoder at t = 0, pool, MLP); `axis_name` as in `eps_pass`."""
  return _on_axis(model, axis_name).apply({"params": params}, x, train=train,
                                          method="classify", rngs={"dropout": rng})


def per_sample_mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over all non-batch axes of (a - b)^2 -> [B]."""
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def soft_cross_entropy(logits_BK: jax.Array, probs_BK: jax.Array) -> jax.Array:
  """-sum_c p_c log softmax(z)_c per sample (T = 1, no T^2), over all K classes."""
  return -jnp.sum(probs_BK * jax.nn.log_softmax(logits_BK, axis=-1), axis=-1)


def batch_mean(values_B: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Mean over the batch; with `axis_name`, over the whole batch split across that mapped
  axis (inside shard_map), so every shard gets the global value."""
  if axis_name is None:
    return jnp.mean(values_B)
  total, n = jax.lax.psum((jnp.sum(values_B), jnp.float32(values_B.size)), axis_name)
  return total / n


def masked_mean(values_B: jax.Array, mask_B: jax.Array,
                axis_name: str | None = None) -> jax.Array:
  """Mean of values over the mask (float weights); an empty mask gives 0, not NaN. With
  `axis_name`, sums and counts cover the whole batch split across that mapped axis."""
  total, n = jnp.sum(mask_B * values_B), jnp.sum(mask_B)
  if axis_name is not None:
    total, n = jax.lax.psum((total, n), axis_name)
  return total / jnp.maximum(n, 1.0)


def draw_t_noise(rng: jax.Array, x: jax.Array, sched: Schedule) -> tuple[jax.Array, jax.Array]:
  """t ~ U{0..T-1} per sample and noise ~ N(0, I) shaped like x, as every `*_loss` draws them."""
  k_t, k_noise = jax.random.split(rng)
  t = sample_timesteps(k_t, x.shape[0], sched.num_timesteps)
  return t, jax.random.normal(k_noise, x.shape, x.dtype)


def _diffusion_terms(model, params, x0, t, noise, rng, sched, train, axis_name=None):
  """Shared eps pass: (eps_pred, x_noisy, per-sample MSE [B])."""
  x_noisy = q_sample(sched, x0, t, noise)
  eps = eps_pass(model, params, x_noisy, t, rng, train, axis_name)
  return eps, x_noisy, per_sample_mse(eps, noise)


# ---------------------------------------------------------------- (3.1) local


def local_terms(model: nn.Module, params: Params, batch: Batch, t: jax.Array,
                noise: jax.Array, rng: jax.Array, sched: Schedule, *, cls_weight: float,
                train: bool = True, axis_name: str | None = None) -> tuple[jax.Array, Terms]:
  """L = MSE(eps_theta(x^w_t, t), eps) + cls_weight * CE(f(x^s), y)  (spec 3.1).

  batch: {"x_diff": [B,H,W,C], "x_cls": [B,H,W,C], "label": int [B]}. With `axis_name` the
  batch is this shard of a batch split over that mapped axis; the terms are the whole batch's.
  """
  k_eps, k_cls = jax.random.split(rng)
  ax = axis_name
  _, _, mse_B = _diffusion_terms(model, params, batch["x_diff"], t, noise, k_eps, sched, train,
                                 ax)
  logits = logits_pass(model, params, batch["x_cls"], k_cls, train, ax)
  labels = batch["label"]
  simple = batch_mean(mse_B, ax)                                                     # (1)
  ce = batch_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), ax)  # (2)
  total = simple + cls_weight * ce
  return total, dict(
      total=total, simple=simple, ce=ce,
      # ldm's VLB term; weight 0 in JDCL (original_elbo_weight), logged only.
      vlb=batch_mean(sched.lvlb_weights[t] * mse_B, ax),
      accuracy=batch_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), ax))


def local_loss(model: nn.Module, params: Params, batch: Batch, rng: jax.Array,
               sched: Schedule, *, cls_weight: float,
               train: bool = True) -> tuple[jax.Array, Terms]:
  """`local_terms` with t ~ U{0..T-1} and eps ~ N(0, I) drawn from rng."""
  k_draw, k_model = jax.random.split(rng)
  t, noise = draw_t_noise(k_draw, batch["x_diff"], sched)
  return local_terms(model, params, batch, t, noise, k_model, sched,
                     cls_weight=cls_weight, train=train)


# ---------------------------------------------------------------- (3.2) global KD


def teacher_outputs(model: nn.Module, teacher_params: Params, x_noisy: jax.Array,
                    t: jax.Array, x_cls: jax.Array, rng: jax.Array, train: bool,
                    axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Teacher eps on x_noisy and softmax(logits) on x_cls, with gradients stopped."""
  k_eps, k_cls = jax.random.split(rng)
  eps = eps_pass(model, teacher_params, x_noisy, t, k_eps, train, axis_name)
  probs = jax.nn.softmax(logits_pass(model, teacher_params, x_cls, k_cls, train, axis_name),
                         axis=-1)
  return jax.lax.stop_gradient(eps), jax.lax.stop_gradient(probs)


def teacher_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The keys of G_{k-1} and L_k inside `kd_terms(rng=...)` (its other two are the student's)."""
  _, _, k_old, k_new = jax.random.split(rng, 4)
  return k_old, k_new


class KDTargets(NamedTuple):
  """The frozen teachers' outputs for one global-stage batch (no gradient flows into them)."""
  eps_old: jax.Array     # eps of G_{k-1} on x_t
  probs_old: jax.Array   # softmax of G_{k-1}'s logits on x^s
  eps_new: jax.Array     # eps of L_k on x_t
  probs_new: jax.Array   # softmax of L_k's logits on x^s


def kd_targets(model: nn.Module, old_params: Params, new_params: Params, x_noisy: jax.Array,
               t: jax.Array, x_cls: jax.Array, rng: jax.Array,
               teacher_train: bool, axis_name: str | None = None) -> KDTargets:
  """Both teachers on the whole batch (the masks in `kd_terms` select what counts). `rng` is
  the key `kd_terms` gets, split the same way, so targets computed apart (steps.py: a step
  ahead, each teacher only on its own subset) match the inline ones."""
  k_old, k_new = teacher_keys(rng)
  eps_old, probs_old = teacher_outputs(model, old_params, x_noisy, t, x_cls, k_old,
                                        teacher_train, axis_name)
  eps_new, probs_new = teacher_outputs(model, new_params, x_noisy, t, x_cls, k_new,
                                        teacher_train, axis_name)
  return KDTargets(eps_old, probs_old, eps_new, probs_new)


def _subset_weights(labels_B, old_class_mask_K, new_class_mask_K, pi_weighting, axis_name):
  """Per-sample old/new masks (float [B]), their counts and the pi weights.

  pi_o = 2 n_o / (n_o + n_n), pi_n = 2 n_n / (n_o + n_n) (main); with
  pi_weighting=False both are 1 (paper_branch, before commit 508cabb).
  """
  m_old = old_class_mask_K[labels_B].astype(jnp.float32)
  m_new = new_class_mask_K[labels_B].astype(jnp.float32)
  n_old, n_new = jnp.sum(m_old), jnp.sum(m_new)
  if axis_name is not None:
    n_old, n_new = jax.lax.psum((n_old, n_new), axis_name)
  if pi_weighting:
    n = jnp.maximum(n_old + n_new, 1.0)
    pi_old, pi_new = 2.0 * n_old / n, 2.0 * n_new / n
  else:
    pi_old = pi_new = jnp.float32(1.0)
  return m_old, m_new, n_old, n_new, pi_old, pi_new


def kd_terms(model: nn.Module, params: Params, old_params: Params, new_params: Params,
             batch: Batch, t: jax.Array, noise: jax.Array, rng: jax.Array, sched: Schedule, *,
             new_class_mask_K: jax.Array, old_class_mask_K: jax.Array,
             cls_active: jax.Array | bool | float, weights: KDWeights | Mapping[str, float],
             teacher_train: bool, train: bool = True,
             cls_kd_active: jax.Array | bool | float | None = None,
             pi_weighting: bool = True,
             targets: KDTargets | None = None,
             axis_name: str | None = None) -> tuple[jax.Array, Terms]:
  """Global-stage loss of spec 3.2 on a batch of generated samples.

  Args:
    batch: {"x_diff", "x_cls", "label"}; labels are the generators' labels.
    new_class_mask_K / old_class_mask_K: bool [K] class sets (traced, so a new
      task reuses the compiled step). Samples outside both sets only enter the
      plain MSE and CE terms.
    cls_active: 0/1 (traced) gate of the classification terms; the caller
      derives it from the training-step count (warm-up).
    weights: KDWeights, or a mapping with its field names.
    teacher_train: run the teachers with dropout (the original's train-mode
      quirk) or deterministically.
    train: dropout in the student.
    cls_kd_active: separate gate for the logit-KD term (CIFAR-100 t9's
      no_wait_kl_classification); None means `cls_active`.
    pi_weighting: static; False gives pi_o = pi_n = 1 (paper_branch).
    targets: the teachers' outputs from `kd_targets` (same batch, t, noise, rng) when they
      were computed elsewhere; then old_params/new_params are not used.
    axis_name: the batch is this shard of a batch split over that mapped axis (inside
      shard_map); means, masked means and counts are then the whole batch's.
  """
  if isinstance(weights, Mapping):
    weights = KDWeights(**weights)
  k_s_eps, k_s_cls, _, _ = jax.random.split(rng, 4)
  labels, x_cls = batch["label"], batch["x_cls"]
  eps, x_noisy, mse_B = _diffusion_terms(model, params, batch["x_diff"], t, noise, k_s_eps,
                                         sched, train, axis_name)
  logits = logits_pass(model, params, x_cls, k_s_cls, train, axis_name)
  if targets is None:
    targets = kd_targets(model, old_params, new_params, x_noisy, t, x_cls, rng, teacher_train,
                         axis_name)
  eps_old, probs_old, eps_new, probs_new = targets

  m_old, m_new, n_old, n_new, pi_old, pi_new = _subset_weights(
      labels, old_class_mask_K, new_class_mask_K, pi_weighting, axis_name)
  active = jnp.asarray(cls_active, jnp.float32)
  kd_active = active if cls_kd_active is None else jnp.asarray(cls_kd_active, jnp.float32)

  ax = axis_name
  simple = batch_mean(mse_B, ax)                                                      # (1)
  ce = batch_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), ax)  # (2)
  # (3) mean over all elements of each masked subset == masked mean of per-sample means.
  eps_mse_old = masked_mean(per_sample_mse(eps, eps_old), m_old, ax)
  eps_mse_new = masked_mean(per_sample_mse(eps, eps_new), m_new, ax)
  # (4) soft-target CE against each teacher's softmax on its own subset.
  softce_old = masked_mean(soft_cross_entropy(logits, probs_old), m_old, ax)
  softce_new = masked_mean(soft_cross_entropy(logits, probs_new), m_new, ax)

  simple_w = weights.simple * simple
  ce_w = active * weights.ce * ce
  diffusion_kd = weights.kd * (eps_mse_new * pi_new + eps_mse_old * pi_old)
  classifier_kd = kd_active * weights.cls_kd * weights.kd * (pi_new * softce_new
                                                             + pi_old * softce_old)
  total = simple_w + ce_w + diffusion_kd + classifier_kd
  return total, dict(
      total=total, simple=simple, simple_weighted=simple_w, ce=ce, ce_weighted=ce_w,
      eps_mse_old=eps_mse_old, eps_mse_new=eps_mse_new, diffusion_kd=diffusion_kd,
      softce_old=softce_old, softce_new=softce_new, classifier_kd=classifier_kd,
      pi_old=pi_old, pi_new=pi_new, n_old=n_old, n_new=n_new, cls_active=active,
      cls_kd_active=kd_active,
      vlb=batch_mean(sched.lvlb_weights[t] * mse_B, ax),
      accuracy=batch_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), ax))


def kd_loss(model: nn.Module, params: Params, old_params: Params, new_params: Params,
            batch: Batch, rng: jax.Array, sched: Schedule, **kwargs) -> tuple[jax.Array, Terms]:
  """`kd_terms` with t and noise drawn from rng; keyword arguments as in `kd_terms`."""
  k_draw, k_model = jax.random.split(rng)
  t, noise = draw_t_noise(k_draw, batch["x_diff"], sched)
  return kd_terms(model, params, old_params, new_params, batch, t, noise, k_model, sched,
                  **kwargs)


# ---------------------------------------------------------------- (6) semi-supervised


def fixmatch_terms(model: nn.Module, params: Params, batch: Batch, t: jax.Array,
                   noise: jax.Array, rng: jax.Array, sched: Schedule, *, cls_weight: float,
                   threshold: float, train: bool = True) -> tuple[jax.Array, Terms]:
  """DiffMatch local loss (spec 6).

  L = MSE(eps_theta(x^{u,diff}_t, t), eps) + lambda CE(f(x^l), y)
      + lambda (1/B_u) sum_i 1[max p_i >= tau] CE(f(x^{u,strong}_i), argmax p_i),
  p = softmax(f(x^{u,weak})) with gradients stopped. The labelled, weak and
  strong images go through one concatenated classifier pass (t = 0).

  batch: {"x_cls": labelled [B_l,...], "label": [B_l], "x_diff", "x_weak",
  "x_strong": unlabelled [B_u,...]}; t and noise are [B_u] / x_diff-shaped.
  """
  k_eps, k_cls = jax.random.split(rng)
  _, _, mse_B = _diffusion_terms(model, params, batch["x_diff"], t, noise, k_eps, sched, train)
  b_l, b_u = batch["x_cls"].shape[0], batch["x_weak"].shape[0]
  x_all = jnp.concatenate([batch["x_cls"], batch["x_weak"], batch["x_strong"]], axis=0)
  logits = logits_pass(model, params, x_all, k_cls, train)
  logits_l, logits_w, logits_s = jnp.split(logits, [b_l, b_l + b_u], axis=0)

  probs_w = jax.nn.softmax(jax.lax.stop_gradient(logits_w), axis=-1)
  pseudo = jnp.argmax(probs_w, axis=-1)
  mask = (jnp.max(probs_w, axis=-1) >= threshold).astype(jnp.float32)

  simple = jnp.mean(mse_B)                                                           # (1)
  ce_sup = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_l, batch["label"]))
  # (3) masked mean over the whole unlabelled batch (not over the confident ones).
  fixmatch = jnp.mean(mask * optax.softmax_cross_entropy_with_integer_labels(logits_s, pseudo))
  total = simple + cls_weight * ce_sup + cls_weight * fixmatch
  return total, dict(
      total=total, simple=simple, ce_sup=ce_sup, fixmatch=fixmatch, mask_rate=jnp.mean(mask),
      accuracy_labelled=jnp.mean(jnp.argmax(logits_l, -1) == batch["label"]))


def fixmatch_loss(model: nn.Module, params: Params, batch: Batch, rng: jax.Array,
                  sched: Schedule, *, cls_weight: float, threshold: float,
                  train: bool = True) -> tuple[jax.Array, Terms]:
  """`fixmatch_terms` with t and noise for the unlabelled diffusion view drawn from rng."""
  k_draw, k_model = jax.random.split(rng)
  t, noise = draw_t_noise(k_draw, batch["x_diff"], sched)
  return fixmatch_terms(model, params, batch, t, noise, k_model, sched,
                        cls_weight=cls_weight, threshold=threshold, train=train)
