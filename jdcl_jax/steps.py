"""Pure train and eval steps. `train.py`/`stages.py` jit them with explicit shardings.

Every step derives its randomness from `fold_in(stage_rng, state.step)`, where `stage_rng` is a
function of (seed, task, stage): nothing random is carried, so a resumed run replays the same
numbers. Augmentation runs inside the step, on the accelerator.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from jdcl_jax import state as state_lib
from jdcl_jax.data import augment
from jdcl_jax.data import batching
from jdcl_jax.diffusion import losses
from jdcl_jax.diffusion.schedule import q_sample

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


def data_parallel_grad(loss_fn: Callable, params: PyTree, batch: PyTree, rng: jax.Array,
                       consts: PyTree, mesh: jax.sharding.Mesh | None
                       ) -> tuple[tuple[jax.Array, Metrics], PyTree]:
  """value_and_grad of `loss_fn(params, batch, rng, consts, axis_name) -> (loss, terms)`.

  One device (or mesh=None): a plain call with axis_name=None. Several on the data axis: each
  device runs the loss on its shard of `batch` (leading axis split; `consts` and `rng`
  replicated) and the loss reduces over the axis, so loss and terms are the whole batch's.
  Dropout masks follow global example indices (unet.ExampleDropout), so the result is the
  single-device one up to float summation order, whatever the device count. The parameters
  enter as ONE flat vector, so the gradient is one all-reduce (the transpose of replicating
  that vector) instead of one per tensor: on
  the 2-core CPU host the per-tensor all-reduces cost 15-30 ms a step, more than splitting
  the batch saved. Batch randomness (views, t, noise) is drawn before, at the global shape.
  """
  if mesh is None or mesh.shape["data"] == 1:
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, consts, None)
  flat, unravel = ravel_pytree(params)

  def per_shard(flat, batch, rng, consts):
    # Varying from here on: per-tensor conversions (and so per-tensor all-reduces in the
    # backward pass) are never needed; custom VJPs (GroupNorm) return varying gradients.
    flat = jax.lax.pcast(flat, "data", to="varying")
    return loss_fn(unravel(flat), batch, rng, consts, "data")
  mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data"), P(), P()),
                         out_specs=P())
  (loss, terms), g = jax.value_and_grad(mapped, has_aux=True)(flat, batch, rng, consts)
  return (loss, terms), unravel(g)


def _local_loss(params, batch, rng, consts, axis_name, *, model, sched, cls_weight):
  del consts
  return losses.local_terms(model, params, batch, batch["t"], batch["noise"], rng, sched,
                            cls_weight=cls_weight, axis_name=axis_name)


def local_step(st: state_lib.TrainState, images_u8: jax.Array, labels: jax.Array,
               rng: jax.Array, *, model: Any, tx: optax.GradientTransformation, sched: Any,
               cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[state_lib.TrainState, Metrics]:
  """One supervised local step: eps-MSE on x^w_t + cls_weight * CE on x^s (spec 3.1).

  `mesh` with several devices on its data axis: data-parallel (`data_parallel_grad`)."""
  k_view, k_loss = jax.random.split(jax.random.fold_in(rng, st.step))
  x_diff, x_cls = two_views(k_view, images_u8, cfg.diffusion_view, cfg.classifier_view)
  k_draw, k_model = jax.random.split(k_loss)        # as losses.local_loss splits its key
  t, noise = losses.draw_t_noise(k_draw, x_diff, sched)
  batch = {"x_diff": x_diff, "x_cls": x_cls, "label": labels, "t": t, "noise": noise}
  loss_fn = functools.partial(_local_loss, model=model, sched=sched, cls_weight=cfg.cls_weight)
  (loss, terms), grads = data_parallel_grad(loss_fn, st.params, batch, k_model, None, mesh)
  new = _apply_update(st, grads, tx, cfg.ema_decay, cfg.ema_warmup)
  return new, {**terms, "loss": loss, "lr": st.opt_state.hyperparams["learning_rate"]}


def global_inputs(images_u8: jax.Array, labels: jax.Array, rng: jax.Array, step: jax.Array, *,
                  sched: Any, cfg: ml_collections.ConfigDict
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """What global step `step` needs that depends on neither the student nor the teachers.

  Returns (the student step's inputs without "targets": the two views, t, noise, labels and
  the loss key; the teachers' inputs: x_t, t, x^s and their two keys). Split from
  `global_step` so the teachers (`teacher_targets`) run a step ahead, beside the student.
  """
  k_view, k_loss = jax.random.split(jax.random.fold_in(rng, step))
  x_diff, x_cls = two_views(k_view, images_u8, cfg.diffusion_view, cfg.classifier_view)
  k_draw, k_model = jax.random.split(k_loss)       # as losses.kd_loss splits its key
  t, noise = losses.draw_t_noise(k_draw, x_diff, sched)
  student = {"x_diff": x_diff, "x_cls": x_cls, "label": labels, "t": t, "noise": noise,
             "rng": k_model}
  teachers = {"x_noisy": q_sample(sched, x_diff, t, noise), "t": t, "x_cls": x_cls,
              "keys": losses.teacher_keys(k_model)}
  return student, teachers


def teacher_rows(labels: np.ndarray, member_K: np.ndarray, bucket: int,
                 num_shards: int = 1) -> np.ndarray:
  """Host side: the batch rows one teacher runs on, as int32 [num_shards * size] of row
  indices local to each of the batch's `num_shards` equal shards (devices).

  Spec 3.2 uses G_{k-1}'s outputs only on old-class samples and L_k's only on new-class ones,
  so each teacher needs just its own subset. Its size varies from batch to batch (uniform
  batches of the synthetic set), so each shard's part is rounded up to a multiple of
  bucket / num_shards (at least one): a few compiled shapes, a few wasted rows. A shard's
  subset rows come first, in batch order; the rest is filled with its other rows (outputs
  there are masked out by the loss), so no index repeats within a shard.
  """
  member = np.asarray(member_K)[np.asarray(labels)].reshape(num_shards, -1)
  step = bucket // num_shards
  size = max(step, -(-int(member.sum(1).max()) // step) * step)   # one of teacher_sizes
  return np.concatenate([np.concatenate([np.flatnonzero(m), np.flatnonzero(~m)])[:size]
                         for m in member]).astype(np.int32)


def teacher_sizes(bucket: int, num_shards: int, batch_size: int) -> list[int]:
  """Every length `teacher_rows` can return: each shard's part is a multiple of
  bucket / num_shards rows, up to the whole shard."""
  step = bucket // num_shards
  return [num_shards * n for n in range(step, batch_size // num_shards + 1, step)]


def teacher_targets(params: PyTree, x_noisy: jax.Array, t: jax.Array, x_cls: jax.Array,
                    rows: jax.Array, key: jax.Array, *, model: Any, train: bool,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """One frozen teacher's eps (on x_t) and softmax (on x^s), computed only on `rows`
  (teacher_rows) and scattered back to batch-sized arrays, zero elsewhere.

  On the digits KD step both teachers on the whole batch were 30 % of the step (0.051 of
  0.170 s, 2-core host); a teacher's cost is linear in its rows. Each device gathers and
  scatters within its own shard: a program with cross-device collectives dispatches
  synchronously on XLA:CPU and would stall the pipeline. Dropout masks follow each row's
  global batch position (unet.ExampleDropout), as in the whole-batch `losses.kd_targets`.
  """
  def per_shard(params, x_noisy, t, x_cls, rows, key, axis_name=None):
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * x_noisy.shape[0]
    sub = model.clone(example_ids=first + rows)
    eps_s, probs_s = losses.teacher_outputs(sub, params, x_noisy[rows], t[rows], x_cls[rows],
                                            key, train)
    eps = jnp.zeros_like(x_noisy).at[rows].set(eps_s, unique_indices=True)
    probs = jnp.zeros(x_noisy.shape[:1] + probs_s.shape[1:], probs_s.dtype)
    return eps, probs.at[rows].set(probs_s, unique_indices=True)

  if mesh is None or mesh.shape["data"] == 1:
    return per_shard(params, x_noisy, t, x_cls, rows, key)
  data = P("data")
  return jax.shard_map(functools.partial(per_shard, axis_name="data"), mesh=mesh,
                       in_specs=(P(), data, data, data, data, P()), out_specs=(data, data)
                       )(params, x_noisy, t, x_cls, rows, key)


def global_step(st: state_lib.TrainState, inputs: dict[str, Any], old_mask: jax.Array,
                new_mask: jax.Array, cls_start: jax.Array, cls_kd_start: jax.Array, *,
                model: Any, tx: optax.GradientTransformation, sched: Any,
                cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
                ) -> tuple[state_lib.TrainState, Metrics]:
  """One global (KD) step of the student on the student half of
  `global_inputs(..., step=st.step)` plus "targets", the teachers' `KDTargets`.

  `old_mask`/`new_mask` are length-K class masks and `cls_start`/`cls_kd_start` the warm-up
  lengths of the CE and classifier-KD terms, all traced, so one compiled step serves every task.
  """
  batch = {k: v for k, v in inputs.items() if k != "rng"}
  # Intended warm-up semantics (spec 8.1.3): classification terms start at a training-step count.
  cls_active = st.step >= cls_start
  weights = losses.KDWeights(simple=cfg.simple_weight, ce=cfg.ce_weight, kd=cfg.kd_weight,
                             cls_kd=cfg.cls_kd_weight)

  def loss_fn(p, batch, rng, consts, axis_name):
    old_mask, new_mask, cls_active, cls_kd_active = consts
    return losses.kd_terms(model, p, None, None, batch, batch["t"], batch["noise"], rng, sched,
                           old_class_mask_K=old_mask, new_class_mask_K=new_mask,
                           cls_active=cls_active, cls_kd_active=cls_kd_active,
                           weights=weights, pi_weighting=cfg.pi_weighting,
                           teacher_train=cfg.teacher_dropout, targets=batch["targets"],
                           axis_name=axis_name)

  consts = (old_mask, new_mask, cls_active, st.step >= cls_kd_start)
  (loss, terms), grads = data_parallel_grad(loss_fn, st.params, batch, inputs["rng"], consts,
                                            mesh)
  new = _apply_update(st, grads, tx, cfg.ema_decay, True)
  return new, {**terms, "loss": loss, "lr": st.opt_state.hyperparams["learning_rate"],
               "cls_active": cls_active.astype(jnp.float32)}


class GlobalFns(NamedTuple):
  inputs_fn: Callable                    # jitted global_inputs, on inputs_mesh
  teacher_fn: Callable                   # jitted teacher_targets, on inputs_mesh
  step_fn: Callable                      # jitted global_step, on the train mesh
  inputs_mesh: jax.sharding.Mesh
  bucket: int                            # teacher_rows' granularity


def teacher_bucket(cfg: ml_collections.ConfigDict) -> int:
  """Rows per teacher-subset bucket: batch_size / teacher_buckets (1 = whole batch)."""
  return cfg.batch_size // cfg.teacher_buckets


def jit_global(mesh: jax.sharding.Mesh, inputs_mesh: jax.sharding.Mesh,
               **static: Any) -> GlobalFns:
  """`global_inputs` and `teacher_targets` jitted on `inputs_mesh`, `global_step` on `mesh`.

  Batch-shaped values are split over each mesh's data axis (a teacher's rows too); keys,
  teachers, masks and the state are replicated. JAX moves the inputs between the
  meshes when they differ.
  """
  from jdcl_jax import sharding

  def inputs_tree(m):   # the sharding of `global_step`'s inputs on mesh m
    repl, data = sharding.replicated(m), sharding.data_sharded(m)
    return {"x_diff": data, "x_cls": data, "label": data, "t": data, "noise": data,
            "rng": repl, "targets": losses.KDTargets(data, data, data, data)}

  model, cfg = static["model"], static["cfg"]
  repl, data = sharding.replicated(inputs_mesh), sharding.data_sharded(inputs_mesh)
  student = {k: v for k, v in inputs_tree(inputs_mesh).items() if k != "targets"}
  teachers = {"x_noisy": data, "t": data, "x_cls": data, "keys": (repl, repl)}
  inputs_fn = jax.jit(functools.partial(global_inputs, sched=static["sched"], cfg=cfg),
                      in_shardings=(data, data, repl, repl),
                      out_shardings=(student, teachers))
  teacher_fn = jax.jit(functools.partial(teacher_targets, model=model,
                                         train=cfg.teacher_dropout, mesh=inputs_mesh),
                       in_shardings=(repl, data, data, data, data, repl),
                       out_shardings=(data, data))
  repl = sharding.replicated(mesh)
  step_fn = jax.jit(functools.partial(global_step, mesh=mesh, **static),
                    in_shardings=(repl, inputs_tree(mesh), repl, repl, repl, repl),
                    out_shardings=(repl, repl), donate_argnums=0)
  return GlobalFns(inputs_fn, teacher_fn, step_fn, inputs_mesh, teacher_bucket(cfg))


def dispatch_targets(fns: GlobalFns, teachers: tuple[PyTree, PyTree],
                     teacher_inputs: dict[str, Any], labels: np.ndarray,
                     masks: tuple[np.ndarray, np.ndarray]) -> losses.KDTargets:
  """Host side: run G_{k-1} on the batch's old-class rows and L_k on its new-class rows.

  labels: the whole global batch's labels on the host; masks: (old, new) bool [K] class
  masks; teachers: (G_{k-1}, L_k) params on `fns.inputs_mesh`.
  """
  from jdcl_jax import sharding  # local import keeps this module free of mesh state
  shards = fns.inputs_mesh.shape["data"]
  data = sharding.data_sharded(fns.inputs_mesh)
  outs = []
  for params, mask, key in zip(teachers, masks, teacher_inputs["keys"]):
    rows = teacher_rows(labels, mask, fns.bucket, shards)
    rows = batching.to_global_batch(batching.host_slice(rows), data)
    outs.append(fns.teacher_fn(params, teacher_inputs["x_noisy"], teacher_inputs["t"],
                               teacher_inputs["x_cls"], rows, key))
  return losses.KDTargets(*outs[0], *outs[1])


def eval_logits(params: PyTree, images_u8: jax.Array, *, model: Any) -> jax.Array:
  """Classifier logits on clean test images at t = 0, dropout off."""
  return model.apply({"params": params}, augment.normalize(images_u8), train=False,
                     method=type(model).classify)


def jit_step(fn: Callable, mesh: jax.sharding.Mesh, num_replicated_extra: int = 0,
             **static: Any) -> Callable:
  """jit a (state, images, labels, rng, *extra) step over the mesh.

  state: replicated in and out, donated (it is replaced every step);
  images, labels: split along the batch over the "data" axis;
  rng and the extra arguments: replicated;
  metrics: replicated scalars.
  """
  from jdcl_jax import sharding  # local import keeps this module free of mesh state
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  in_sh = (repl, data, data, repl) + (repl,) * num_replicated_extra
  return jax.jit(functools.partial(fn, mesh=mesh, **static), in_shardings=in_sh,
                 out_shardings=(repl, repl), donate_argnums=0)
