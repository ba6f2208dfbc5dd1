"""`train_and_evaluate(config, workdir)`: the whole continual task sequence in one process.

Resume order: 1) the newest readable checkpoint in `workdir/checkpoints`; 2) from scratch.
A finished run prints its results and returns without training.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from clu import periodic_actions

from jdcl_jax import checkpointing
from jdcl_jax import config_check
from jdcl_jax import methods
from jdcl_jax import precompile
from jdcl_jax import sharding
from jdcl_jax import stages
from jdcl_jax import state as state_lib
from jdcl_jax import steps
from jdcl_jax.cl import metrics as cl_metrics
from jdcl_jax.cl import replay as replay_lib
from jdcl_jax.data import scenario
from jdcl_jax.data import sources
from jdcl_jax.diffusion import schedule as schedule_lib
from jdcl_jax.models import unet


def _build_context(config: ml_collections.ConfigDict, workdir: str) -> stages.RunContext:
  data = sources.load_source(config.data)
  config_check.check_data(config, data)
  tasks = scenario.task_classes(data.num_classes, config.cl.num_tasks, config.cl.class_order_seed)
  mesh = sharding.make_mesh(config.mesh.data)
  sample_mesh = sharding.make_mesh(config.mesh.sample_data)
  for what, bs, m in (("local.batch_size", config.local.batch_size, mesh),
                      ("glob.batch_size", config.glob.batch_size, mesh),
                      ("eval.batch_size", config.eval.batch_size, sample_mesh),
                      ("replay.sample_batch_size", config.replay.sample_batch_size, sample_mesh)):
    sharding.check_batch_divisible(bs, m, what)
  inputs_mesh = sharding.spare_mesh(mesh, sample_mesh, config.glob.batch_size)
  sharding.check_batch_divisible(steps.teacher_bucket(config.glob), inputs_mesh,
                                 "glob.batch_size / glob.teacher_buckets")
  model = unet.JointUNet(unet.ModelConfig(**config.model.to_dict()))
  sched = schedule_lib.make_schedule(config.diffusion.num_timesteps, config.diffusion.beta_start,
                                     config.diffusion.beta_end)
  tx = state_lib.make_optimizer(config.local.weight_decay)
  static = dict(model=model, tx=tx, sched=sched)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  hooks = [periodic_actions.ReportProgress(num_train_steps=_planned_steps(config),
                                           writer=writer, every_secs=60.0)]
  if config.log.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.log.profile_steps,
                                          logdir=workdir))
  return stages.RunContext(
      config=config, workdir=workdir, model=model, sched=sched, mesh=mesh,
      sample_mesh=sample_mesh, data=data,
      tasks=tasks, mngr=checkpointing.make_manager(workdir, config.checkpoint.max_to_keep),
      writer=writer, hooks=tuple(hooks), tx=tx,
      local_step=steps.jit_step(steps.local_step, mesh, cfg=config.local, **static),
      global_fns=steps.jit_global(mesh, inputs_mesh, cfg=config.glob, **static),
      eval_fn=jax.jit(functools.partial(steps.eval_logits, model=model),
                      in_shardings=(sharding.replicated(sample_mesh),
                                    sharding.data_sharded(sample_mesh)),
                      out_shardings=sharding.data_sharded(sample_mesh)),
      generate_fn=replay_lib.make_generate_fn(model, sched, config.replay,
                                              data.x_train.shape[1:], sample_mesh))


def _planned_steps(config: ml_collections.ConfigDict) -> int:
  n = config.cl.num_tasks
  total = sum(stages.task_value(config.local, "steps", t) for t in range(n))
  if config.method == "jdcl":
    total += sum(stages.task_value(config.glob, "steps", t) for t in range(1, n))
  return int(total)


def _abstract_item(ctx: stages.RunContext, name: str, meta: dict) -> Any:
  """Shapes/dtypes/shardings of a checkpoint item, built without allocating (eval_shape)."""
  repl = sharding.replicated(ctx.mesh)
  params = unet.param_shapes(ctx.model.config)
  if name == "replay":
    n = meta["replay_shape"][0]
    tree = {"x": jax.ShapeDtypeStruct(tuple(meta["replay_shape"]), np.uint8),
            "y": jax.ShapeDtypeStruct((n,), np.int32)}
  elif name == "state":
    tree = state_lib.abstract_state(params, ctx.tx)
  elif name in ("prev_global", "local"):
    tree = jax.eval_shape(state_lib.fresh_snapshot, params)
  else:
    raise ValueError(f"checkpoint has an unknown item {name!r}")
  return sharding.abstract(tree, repl)


def _initial_meta(config: ml_collections.ConfigDict) -> dict:
  n = config.cl.num_tasks
  return {"task": 0, "phase": "local", "step": 0, "total_steps": 0, "wall_time_s": 0.0,
          "acc_ema": cl_metrics.empty_matrix(n), "acc_raw": cl_metrics.empty_matrix(n)}


def _finish_task(ctx: stages.RunContext, task: int, glob: state_lib.Snapshot,
                 meta: dict) -> dict:
  """Evaluate G_k, fill row k of the accuracy matrices, checkpoint the task boundary."""
  acc = stages.evaluate(ctx, glob, task)
  meta = {**meta, "acc_ema": [list(r) for r in meta["acc_ema"]],
          "acc_raw": [list(r) for r in meta["acc_raw"]]}
  for name in ("ema", "raw"):
    meta[f"acc_{name}"][task][:task + 1] = acc[name]
  scalars = {f"eval/acc_task{k + 1}_{w}": acc[w][k] for w in ("ema", "raw") for k in range(task + 1)}
  scalars.update({f"eval/avg_acc_{w}": cl_metrics.average_accuracy(meta[f"acc_{w}"], task)
                  for w in ("ema", "raw")})
  scalars.update({f"eval/avg_forgetting_{w}": cl_metrics.average_forgetting(meta[f"acc_{w}"], task)
                  for w in ("ema", "raw")})
  ctx.writer.write_scalars(meta["total_steps"], scalars)
  ctx.writer.flush()
  logging.info("after task %d: %s", task + 1, {k: round(v, 4) for k, v in scalars.items()})
  last = task + 1 == ctx.config.cl.num_tasks
  meta = {**meta, "task": task + 1, "phase": "done" if last else "local", "step": 0}
  meta.pop("replay_shape", None)
  checkpointing.save(ctx.mngr, meta, {"prev_global": glob})
  return meta


def results_dict(config: ml_collections.ConfigDict, meta: dict) -> dict:
  report = config.eval.report
  res = {"acc_matrix": meta[f"acc_{report}"], "acc_matrix_ema": meta["acc_ema"],
         "acc_matrix_raw": meta["acc_raw"], "report_weights": report}
  for w in ("ema", "raw"):
    res[f"avg_acc_{w}"] = cl_metrics.average_accuracy(meta[f"acc_{w}"])
    res[f"avg_forgetting_{w}"] = cl_metrics.average_forgetting(meta[f"acc_{w}"])
  res["avg_acc"], res["avg_forgetting"] = res[f"avg_acc_{report}"], res[f"avg_forgetting_{report}"]
  res.update({"wall_time_s": meta["wall_time_s"], "stage_seconds": meta.get("stage_seconds", {}),
              "replay_stats": meta.get("replay_stats", {}), "seed": config.seed,
              "config": json.loads(config.to_json_best_effort())})
  return res


def run_devices(ctx: stages.RunContext) -> dict:
  """What the (last segment of the) run ran on: the device count differs from a config's
  `mesh` fields (-1 = all), and on CPU it is set by mesh.cpu_devices."""
  return {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
          "count": jax.device_count(), "processes": jax.process_count(),
          "train": ctx.mesh.shape["data"], "sample": ctx.sample_mesh.shape["data"]}


def _print_results(res: dict) -> None:
  for w in ("ema", "raw"):
    print(cl_metrics.format_table(res[f"acc_matrix_{w}"], f"\nAccuracy (%) with {w} weights"))
  print(f"\nA_T = {100 * res['avg_acc']:.2f}%   F_T = {100 * res['avg_forgetting']:.2f}%   "
        f"({res['report_weights']} weights)   wall time {res['wall_time_s']:.0f} s", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run (or resume) every task; write results.json; return the results dict."""
  config_check.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  ctx = _build_context(config, workdir)          # loads and checks the data before any compute
  config_check.check_workdir_config(config, workdir, has_checkpoints=bool(ctx.mngr.all_steps()))
  try:
    res = _run(ctx)
  finally:
    ctx.mngr.close()        # waits for an in-flight async save, also when a stage raised
    ctx.writer.close()
  _print_results(res)
  return res


def _start_compiles(ctx: stages.RunContext, meta: dict) -> dict:
  """Background compiles (precompile), in the order the run will need the programs: the local
  step first when the run starts (or resumes) in a local stage, then evaluation and the later
  stages' programs; the local step last, or not at all when no local stage is left, when it
  resumes in a replay or global stage."""
  def later() -> list[precompile.Job]:
    return precompile.eval_jobs(ctx) + methods.LATER_PROGRAMS[ctx.config.method](ctx)
  local = functools.partial(precompile.local_jobs, ctx)
  if meta["phase"] == "local":
    local_f, later_f = precompile.start(local, later)
  else:
    more_tasks = meta["task"] + 1 < ctx.config.cl.num_tasks
    later_f, local_f = precompile.start(later, local if more_tasks else list)
  return {"local_compile": local_f, "background": later_f}


def _run(ctx: stages.RunContext) -> dict:
  config, workdir = ctx.config, ctx.workdir
  restored = checkpointing.restore_latest(ctx.mngr, functools.partial(_abstract_item, ctx))
  meta, items = restored if restored else (_initial_meta(config), {})
  if restored:
    logging.info("resuming: task %d, phase %s, step %d", meta["task"] + 1, meta["phase"],
                 meta["step"])
  method = methods.METHODS[config.method]
  if meta["task"] < config.cl.num_tasks:
    ctx = dataclasses.replace(ctx, **_start_compiles(ctx, meta))
  t_start, wall0 = time.time(), meta["wall_time_s"]
  for task in range(meta["task"], config.cl.num_tasks):
    glob, meta = method(ctx, task, meta, items)
    meta = _finish_task(ctx, task, glob, {**meta, "wall_time_s": wall0 + time.time() - t_start})
    items = {"prev_global": glob}
  ctx.mngr.wait_until_finished()
  res = {**results_dict(config, meta), "devices": run_devices(ctx)}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(res, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  return res
