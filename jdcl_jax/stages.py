"""The stages of one continual task: local training, replay generation, global (KD) training,
evaluation. Each stage is a function of immutable run handles (`RunContext`) and pytrees, and
returns pytrees; checkpoint and log calls go through the context's manager and writer.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jdcl_jax import checkpointing
from jdcl_jax import precompile
from jdcl_jax import sharding
from jdcl_jax import state as state_lib
from jdcl_jax import steps
from jdcl_jax.cl import metrics as cl_metrics
from jdcl_jax.cl import replay as replay_lib
from jdcl_jax.data import batching
from jdcl_jax.data import scenario
from jdcl_jax.models import unet

PyTree = Any
PER_TASK_KEYS = {"local": ("steps", "lr"),
                 "glob": ("steps", "lr", "cls_start_step", "cls_kd_no_wait")}
# How many train steps the host may dispatch ahead of the devices. XLA:CPU runs each device's
# part of a multi-device program on a client pool with one thread per device (2 on a 2-core
# host), and a dispatch that finds 32 programs in flight on a device blocks one of those
# threads; a collective then waits for its other half forever and the process aborts after
# 40 s ("Termination timeout for all reduce ... only 1 of them arrived"). Unbounded, a
# data-parallel run hit this at its first KD step (then 2 programs per step); 4 steps ahead
# keep at most ~20 programs in flight (a KD step is now 4: inputs, two teachers, student) and
# still hide dispatch. benchmarks/README.md has the repro.
MAX_STEPS_AHEAD = 4


@dataclasses.dataclass(frozen=True)
class RunContext:
  """Immutable handles shared by the stages of one run (no training state lives here)."""
  config: ml_collections.ConfigDict
  workdir: str
  model: unet.JointUNet
  sched: Any
  mesh: jax.sharding.Mesh          # train steps
  sample_mesh: jax.sharding.Mesh   # forward-only work: replay sampling/labelling, evaluation
  data: Any                       # data.sources.ArrayDataset
  tasks: list[list[int]]
  mngr: Any                       # orbax CheckpointManager
  writer: Any                     # clu MetricWriter
  hooks: tuple[Callable[[int], None], ...]   # CLU periodic actions, called with the run step
  local_step: Callable
  global_fns: steps.GlobalFns     # teachers/inputs fn + student step (steps.jit_global)
  eval_fn: Callable
  generate_fn: Callable           # replay sampling + labelling (cl/replay.make_generate_fn)
  tx: Any
  background: Any = None          # Future of the later stages' background compiles (precompile)
  local_compile: Any = None       # Future of the local step's background compile (precompile)


def task_value(stage_cfg: ml_collections.ConfigDict, key: str, task: int) -> Any:
  """A stage field with its per-task override ("t3" = third task, 1-based) applied."""
  over = stage_cfg.per_task.get(f"t{task + 1}", None)
  return over[key] if over is not None and key in over else stage_cfg[key]


def init_snapshot(ctx: RunContext, task: int) -> state_lib.Snapshot:
  params = unet.init_params(ctx.model.config, steps.stage_rng(ctx.config.seed, task, "init"))
  return sharding.replicate_tree(state_lib.fresh_snapshot(params), ctx.mesh)


def _train_loop(ctx: RunContext, st: state_lib.TrainState, stage: str, task: int,
                num_steps: int, advance: Callable, meta: dict,
                save_items: dict) -> tuple[state_lib.TrainState, dict]:
  """Run `num_steps` steps from `st.step` with `advance(st, step) -> (st, metrics)`; log,
  checkpoint and call hooks along the way."""
  cfg = ctx.config
  t0, window = time.time(), []
  for step in range(int(st.step), num_steps):
    st, m = advance(st, step)
    window.append(m)
    if len(window) > MAX_STEPS_AHEAD:   # steps before the window were synced when it was logged
      jax.block_until_ready(window[-MAX_STEPS_AHEAD - 1])
    run_step = meta["total_steps"] + step + 1
    for hook in ctx.hooks:
      hook(run_step)
    if (step + 1) % cfg.log.every_steps == 0 or step + 1 == num_steps:
      host = jax.device_get(window)           # one host sync per logging window
      _write_train_metrics(ctx, stage, task, run_step, host, len(host), time.time() - t0)
      window, t0 = [], time.time()
    if (step + 1) % cfg.checkpoint.every_steps == 0 and step + 1 < num_steps:
      checkpointing.save(ctx.mngr, {**meta, "step": step + 1}, {**save_items, "state": st})
  meta = {**meta, "total_steps": meta["total_steps"] + num_steps}
  return st, meta


def _batch_indices(ctx: RunContext, stage: str, task: int, step: int, n: int) -> np.ndarray:
  """Indices of global batch `step` of a stage: a function of (seed, task, stage, step)."""
  bs = (ctx.config.local if stage == "local" else ctx.config.glob).batch_size
  return batching.batch_indices(ctx.config.seed, task, stage, step, n, bs)


def _batch(ctx: RunContext, stage: str, task: int, step: int, images: np.ndarray,
           labels: np.ndarray, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
  """Global batch `step` of a stage, this process's share placed split on `mesh`."""
  return _place(images, labels, _batch_indices(ctx, stage, task, step, len(labels)), mesh)


def _place(images: np.ndarray, labels: np.ndarray, idx: np.ndarray,
           mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
  idx = batching.host_slice(idx)
  data_sh = sharding.data_sharded(mesh)
  return (batching.to_global_batch(images[idx], data_sh),
          batching.to_global_batch(labels[idx].astype(np.int32), data_sh))


def _local_advance(ctx: RunContext, task: int, images: np.ndarray,
                   labels: np.ndarray) -> Callable:
  rng = steps.stage_rng(ctx.config.seed, task, "local")

  def advance(st, step):
    x, y = _batch(ctx, "local", task, step, images, labels, ctx.mesh)
    return ctx.local_step(st, x, y, rng)
  return advance


def _global_advance(ctx: RunContext, task: int, images: np.ndarray, labels: np.ndarray,
                    teachers: tuple, masks: tuple, gates: tuple, num_steps: int) -> Callable:
  """Student steps fed by the teachers' outputs, computed one step ahead.

  The inputs of step s+1 are dispatched before the student step s, so on separate devices
  they overlap it (see steps.global_inputs). Each teacher runs only on the rows of its own
  classes (`masks`: G_{k-1}'s old classes, L_k's new ones; steps.teacher_rows), read off the
  batch's labels here on the host. Everything depends only on (seed, task, step), so resuming
  and pipelining change no number.
  """
  fns = ctx.global_fns
  rng = steps.stage_rng(ctx.config.seed, task, "global")
  teachers = tuple(sharding.to_mesh(p, fns.inputs_mesh) for p in teachers)
  pending = {}

  def prepare(step):
    idx = _batch_indices(ctx, "global", task, step, len(labels))
    x, y = _place(images, labels, idx, fns.inputs_mesh)
    student, tin = fns.inputs_fn(x, y, rng, jnp.asarray(step, jnp.int32))
    return {**student,
            "targets": steps.dispatch_targets(fns, teachers, tin, labels[idx], masks)}

  def advance(st, step):
    inputs = pending.pop(step) if step in pending else prepare(step)
    if step + 1 < num_steps:
      pending[step + 1] = prepare(step + 1)
    return fns.step_fn(st, inputs, *gates)
  return advance


def _write_train_metrics(ctx: RunContext, stage: str, task: int, run_step: int,
                         host: list, n_steps: int, seconds: float) -> None:
  scalars = {f"train/{stage}/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
  scalars.update({"train/task": task + 1, f"train/{stage}/steps_per_sec": n_steps / max(seconds, 1e-9)})
  ctx.writer.write_scalars(run_step, scalars)


def local_stage(ctx: RunContext, task: int, prev: Optional[state_lib.Snapshot],
                st: Optional[state_lib.TrainState], meta: dict) -> tuple[state_lib.Snapshot, dict]:
  """Train a local model on the real data of `task` (spec 4.3), resuming from `st` if given."""
  cfg = ctx.config.local
  if st is None:
    start = prev if (cfg.init == "prev_global" and prev is not None) else init_snapshot(ctx, task)
    st = _new_state(ctx, _maybe_restart_ema(start, cfg), task_value(cfg, "lr", task))
  idx = np.flatnonzero(np.isin(ctx.data.y_train, ctx.tasks[task]))
  items = {"prev_global": prev} if prev is not None else {}
  advance = _local_advance(ctx, task, ctx.data.x_train[idx], ctx.data.y_train[idx])
  precompile.wait(ctx.local_compile)   # compiling it here too would do the work twice
  st, meta = _train_loop(ctx, st, "local", task, task_value(cfg, "steps", task), advance,
                         meta, items)
  return st.snapshot(), meta


def replay_stage(ctx: RunContext, task: int, prev: state_lib.Snapshot,
                 local: state_lib.Snapshot) -> tuple[dict, dict]:
  """The synthetic set: old classes from G_{k-1}, new classes from L_k, exact quotas."""
  cfg = ctx.config.replay
  precompile.wait(ctx.background)
  rng = steps.stage_rng(ctx.config.seed, task, "replay")
  old = [c for k in range(task) for c in ctx.tasks[k]]
  parts, stats = [], {}
  for role, snap, classes, scale in (("old", prev, old, cfg.fill_scale_old),
                                     ("new", local, ctx.tasks[task], cfg.fill_scale_new)):
    # Placed on the sampling mesh once, not re-transferred for every generated batch.
    sample_p, label_p = (sharding.to_mesh(p, ctx.sample_mesh) for p in (
        snap.ema_params if cfg.sample_with_ema else snap.params,
        snap.ema_params if cfg.label_with_ema else snap.params))
    t0 = time.time()
    x, y, s = replay_lib.generate_class_set(
        ctx.generate_fn, sample_p, label_p, classes, cfg.samples_per_class,
        jax.random.fold_in(rng, 0 if role == "old" else 1), cfg, tuple(scale))
    stats[role] = {**s, "seconds": time.time() - t0}
    parts.append((x, y))
  x = np.concatenate([p[0] for p in parts])
  y = np.concatenate([p[1] for p in parts])
  return {"x": x, "y": y}, stats


def _new_state(ctx: RunContext, snap: state_lib.Snapshot, lr: float) -> state_lib.TrainState:
  """A fresh stage state committed to the train mesh, like the states the step returns and
  the ones restored from checkpoints. Left uncommitted, the optimizer's new scalars made the
  first call trace and compile the step a second time (~11 s per step function on CPU)."""
  return sharding.to_mesh(state_lib.new_state(snap, ctx.tx, lr), ctx.mesh)


def _maybe_restart_ema(snap: state_lib.Snapshot,
                       cfg: ml_collections.ConfigDict) -> state_lib.Snapshot:
  """Faithful: a model built from a checkpoint continues its EMA (shadow and counter, spec 2.3).
  `ema_continue=False` restarts it from the current weights with a fresh LitEma warm-up, which
  keeps the EMA from lagging a whole stage behind when stages are short."""
  return snap if cfg.ema_continue else state_lib.fresh_snapshot(snap.params)


def global_stage(ctx: RunContext, task: int, prev: state_lib.Snapshot,
                 local: state_lib.Snapshot, replay: dict, st: Optional[state_lib.TrainState],
                 meta: dict) -> tuple[state_lib.Snapshot, dict]:
  """Consolidate into G_k: student from G_{k-1} (raw weights, EMA continued), synthetic data
  only, teachers G_{k-1} (old classes) and L_k (new classes)."""
  cfg, k = ctx.config.glob, ctx.model.config.num_classes
  precompile.wait(ctx.background)
  if st is None:
    st = _new_state(ctx, _maybe_restart_ema(prev, cfg), task_value(cfg, "lr", task))
  old = [c for j in range(task) for c in ctx.tasks[j]]
  cls_start = int(task_value(cfg, "cls_start_step", task))
  cls_kd_start = 0 if task_value(cfg, "cls_kd_no_wait", task) else cls_start
  masks = (scenario.class_mask(old, k), scenario.class_mask(ctx.tasks[task], k))
  gates = sharding.to_mesh((*map(jnp.asarray, masks), jnp.asarray(cls_start, jnp.int32),
                            jnp.asarray(cls_kd_start, jnp.int32)), ctx.mesh)
  num_steps = task_value(cfg, "steps", task)
  advance = _global_advance(ctx, task, replay["x"], replay["y"], (prev.params, local.params),
                            masks, gates, num_steps)
  items = {"prev_global": prev, "local": local, "replay": replay}
  st, meta = _train_loop(ctx, st, "global", task, num_steps, advance, meta, items)
  return st.snapshot(), meta


def evaluate(ctx: RunContext, snap: state_lib.Snapshot, upto: int) -> dict[str, list[float]]:
  """Per-task accuracy on the test images of tasks 0..upto, with EMA and raw weights."""
  seen = [c for k in range(upto + 1) for c in ctx.tasks[k]]
  sel = np.isin(ctx.data.y_test, seen)
  x, y = ctx.data.x_test[sel], ctx.data.y_test[sel]
  out = {}
  for name, params in (("ema", snap.ema_params), ("raw", snap.params)):
    pred = predict(ctx, params, x)
    out[name] = cl_metrics.per_task_accuracy(pred, y, ctx.tasks, upto)
  return out


def predict(ctx: RunContext, params: PyTree, x: np.ndarray) -> np.ndarray:
  """argmax predictions in fixed-size padded batches (one compiled program)."""
  bs = ctx.config.eval.batch_size
  data_sh = sharding.data_sharded(ctx.sample_mesh)
  params = sharding.to_mesh(params, ctx.sample_mesh)
  preds = []
  for i in range(0, len(x), bs):
    chunk = x[i:i + bs]
    pad = np.zeros((bs - len(chunk),) + x.shape[1:], x.dtype)
    batch = batching.host_slice(np.concatenate([chunk, pad]))
    logits = ctx.eval_fn(params, batching.to_global_batch(batch, data_sh))
    # Gather across processes so every host computes the same accuracies.
    logits = multihost_utils.process_allgather(logits, tiled=True)
    preds.append(np.asarray(logits).argmax(-1)[:len(chunk)])
  return np.concatenate(preds) if preds else np.zeros((0,), np.int64)
