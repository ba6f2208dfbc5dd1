"""Continual methods as pipelines of stages over one task. Registry: `METHODS`.

A method function takes the run handles, the task index, the progress record `meta` and the
restored checkpoint items, and returns the model that is "global" after this task plus the updated
record. It resumes mid-task from `meta["phase"]` ("local" -> "replay" -> "global"). New baselines
(no-KD, one-stage, separate generator) are new functions here plus a config, not trainer copies.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from jdcl_jax import checkpointing
from jdcl_jax import precompile
from jdcl_jax import stages
from jdcl_jax import state as state_lib

Items = dict[str, Any]
MethodFn = Callable[[stages.RunContext, int, dict, Items], tuple[state_lib.Snapshot, dict]]


def _local(ctx: stages.RunContext, task: int, meta: dict, items: Items) -> tuple[Any, dict]:
  t0 = time.time()
  local, meta = stages.local_stage(ctx, task, items.get("prev_global"), items.get("state"), meta)
  acc = stages.evaluate(ctx, local, task)
  logging.info("task %d local model: per-task acc (ema) %s", task + 1, acc["ema"])
  ctx.writer.write_scalars(meta["total_steps"], {
      "eval/local/acc_current_task_ema": acc["ema"][task],
      "eval/local/acc_current_task_raw": acc["raw"][task]})
  meta = _timed(meta, task, "local", t0)
  meta.setdefault("local_acc", {})[str(task)] = acc
  return local, meta


def jdcl(ctx: stages.RunContext, task: int, meta: dict, items: Items
         ) -> tuple[state_lib.Snapshot, dict]:
  """Task 1: local = global. Task k >= 2: local -> replay -> global (KD) (spec 4.2-4.4)."""
  prev = items.get("prev_global")
  if meta["phase"] == "local":
    local, meta = _local(ctx, task, meta, items)
    if task == 0:
      return local, meta
    meta = {**meta, "phase": "replay", "step": 0}
    checkpointing.save(ctx.mngr, meta, {"prev_global": prev, "local": local})
    items = {"prev_global": prev, "local": local}
  if meta["phase"] == "replay":
    t0 = time.time()
    replay, stats = stages.replay_stage(ctx, task, prev, items["local"])
    meta = _timed({**meta, "phase": "global", "step": 0,
                   "replay_shape": list(replay["x"].shape)}, task, "replay", t0)
    meta.setdefault("replay_stats", {})[str(task)] = stats
    logging.info("task %d replay: %s", task + 1, {r: {k: v for k, v in s.items()
                                                      if k in ("generated", "kept", "filled")}
                                                  for r, s in stats.items()})
    items = {"prev_global": prev, "local": items["local"], "replay": replay}
    checkpointing.save(ctx.mngr, meta, items)
  t0 = time.time()
  glob, meta = stages.global_stage(ctx, task, prev, items["local"], items["replay"],
                                   items.get("state"), meta)
  return glob, _timed(meta, task, "global", t0)


def finetune(ctx: stages.RunContext, task: int, meta: dict, items: Items
             ) -> tuple[state_lib.Snapshot, dict]:
  """Lower bound: keep training one model on each new task's real data (no replay, no KD).

  Set `local.init = "prev_global"` so the model (and its EMA) carries over between tasks.
  """
  local, meta = _local(ctx, task, meta, items)
  return local, meta


def _timed(meta: dict, task: int, stage: str, t0: float) -> dict:
  times = dict(meta.get("stage_seconds", {}))
  times[f"t{task + 1}/{stage}"] = times.get(f"t{task + 1}/{stage}", 0.0) + time.time() - t0
  return {**meta, "stage_seconds": times}


METHODS: dict[str, MethodFn] = {"jdcl": jdcl, "finetune": finetune}

# Programs a method needs only after its first stage, compiled in the background meanwhile.
LATER_PROGRAMS: dict[str, Callable[[stages.RunContext], list[precompile.Job]]] = {
    "jdcl": lambda ctx: (precompile.replay_jobs(ctx) + precompile.global_jobs(ctx)
                         if ctx.config.cl.num_tasks > 1 else []),
    "finetune": lambda ctx: [],
}
