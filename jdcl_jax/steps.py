"""Pure train and eval steps. `train.py`/`stages.py` jit them with explicit shardings.

Every step derives its randomness from `fold_in(stage_rng, state.step)`, where `stage_rng` is a
function of (seed, task, stage): nothing random is carried, so a resumed run replays the same
numbers. Augmentation runs inside the step, on the accelerator.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jdcl_jax import state as state_lib
from jdcl_jax.data import augment
from jdcl_jax.diffusion import losses

PyTree = Any
Metrics = dict[str, jax.Array]


def stage_rng(seed: int, task: int, stage: str) -> jax.Array:
  """The base key of one stage of one task. Stage names map to fixed integers."""
  stage_id = {"init": 0, "local": 1, "replay": 2, "global": 3, "eval": 4}[stage]
  key = jax.random.key(seed)
  return jax.random.fold_in(jax.random.fold_in(key, task), stage_id)


def two_views(rng: jax.Array, images_u8: jax.Array, diff_cfg: ml_collections.ConfigDict,
              cls_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The diffusion view x^w and the classifier view x^s of the same images (spec 5.3)."""
  k_d, k_c = jax.random.split(rng)
  x_diff = augment.diffusion_view(k_d, images_u8, scale=diff_cfg.rrc_scale, flip=diff_cfg.flip)
  x_cls = augment.classifier_view(k_c, images_u8, randaugment=cls_cfg.randaugment,
                                  cutout=cls_cfg.cutout, flip=cls_cfg.flip, pad=cls_cfg.crop_pad)
  return x_diff, x_cls


def _apply_update(st: state_lib.TrainState, grads: PyTree, tx: optax.GradientTransformation,
                  ema_decay: float, ema_warmup: bool) -> state_lib.TrainState:
  updates, opt_state = tx.update(grads, st.opt_state, st.params)
  params = optax.apply_updates(st.params, updates)
  ema, count = state_lib.ema_update(st.ema_params, params, st.ema_count, ema_decay, ema_warmup)
  return st.replace(step=st.step + 1, params=params, ema_params=ema, ema_count=count,
                    opt_state=opt_state)


def local_step(st: state_lib.TrainState, images_u8: jax.Array, labels: jax.Array,
               rng: jax.Array, *, model: Any, tx: optax.GradientTransformation, sched: Any,
               cfg: ml_collections.ConfigDict) -> tuple[state_lib.TrainState, Metrics]:
  """One supervised local step: eps-MSE on x^w_t + cls_weight * CE on x^s (spec 3.1)."""
  k_view, k_loss = jax.random.split(jax.random.fold_in(rng, st.step))
  x_diff, x_cls = two_views(k_view, images_u8, cfg.diffusion_view, cfg.classifier_view)
  batch = {"x_diff": x_diff, "x_cls": x_cls, "label": labels}
  loss_fn = functools.partial(losses.local_loss, model, batch=batch, rng=k_loss, sched=sched,
                              cls_weight=cfg.cls_weight)
  (loss, terms), grads = jax.value_and_grad(lambda p: loss_fn(p), has_aux=True)(st.params)
  new = _apply_update(st, grads, tx, cfg.ema_decay, cfg.ema_warmup)
  return new, {**terms, "loss": loss, "lr": st.opt_state.hyperparams["learning_rate"]}


def global_step(st: state_lib.TrainState, images_u8: jax.Array, labels: jax.Array,
                rng: jax.Array, old_params: PyTree, new_params: PyTree, old_mask: jax.Array,
                new_mask: jax.Array, cls_start: jax.Array, cls_kd_start: jax.Array, *, model: Any,
                tx: optax.GradientTransformation, sched: Any,
                cfg: ml_collections.ConfigDict) -> tuple[state_lib.TrainState, Metrics]:
  """One global (KD) step on synthetic data with the two frozen teachers (spec 3.2).

  `old_mask`/`new_mask` are length-K class masks and `cls_start`/`cls_kd_start` the warm-up
  lengths of the CE and classifier-KD terms, all traced, so one compiled step serves every task.
  """
  k_view, k_loss = jax.random.split(jax.random.fold_in(rng, st.step))
  x_diff, x_cls = two_views(k_view, images_u8, cfg.diffusion_view, cfg.classifier_view)
  batch = {"x_diff": x_diff, "x_cls": x_cls, "label": labels}
  # Intended warm-up semantics (spec 8.1.3): classification terms start at a training-step count.
  cls_active = st.step >= cls_start
  weights = losses.KDWeights(simple=cfg.simple_weight, ce=cfg.ce_weight, kd=cfg.kd_weight,
                             cls_kd=cfg.cls_kd_weight)

  def loss_fn(p):
    return losses.kd_loss(model, p, old_params, new_params, batch, k_loss, sched,
                          old_class_mask_K=old_mask, new_class_mask_K=new_mask,
                          cls_active=cls_active, cls_kd_active=st.step >= cls_kd_start,
                          weights=weights, pi_weighting=cfg.pi_weighting,
                          teacher_train=cfg.teacher_dropout)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
  new = _apply_update(st, grads, tx, cfg.ema_decay, True)
  return new, {**terms, "loss": loss, "lr": st.opt_state.hyperparams["learning_rate"],
               "cls_active": cls_active.astype(jnp.float32)}


def eval_logits(params: PyTree, images_u8: jax.Array, *, model: Any) -> jax.Array:
  """Classifier logits on clean test images at t = 0, dropout off."""
  return model.apply({"params": params}, augment.normalize(images_u8), train=False,
                     method=type(model).classify)


def jit_step(fn: Callable, mesh: jax.sharding.Mesh, num_replicated_extra: int = 0,
             **static: Any) -> Callable:
  """jit a (state, images, labels, rng, *extra) step over the mesh.

  state: replicated in and out, donated (it is replaced every step);
  images, labels: split along the batch over the "data" axis;
  rng and the extra arguments (teachers, masks): replicated;
  metrics: replicated scalars.
  """
  from jdcl_jax import sharding  # local import keeps this module free of mesh state
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  in_sh = (repl, data, data, repl) + (repl,) * num_replicated_extra
  return jax.jit(functools.partial(fn, **static), in_shardings=in_sh,
                 out_shardings=(repl, repl), donate_argnums=0)
