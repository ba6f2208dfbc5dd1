"""Orbax checkpoints of the continual run: pytree items plus a JSON `meta` record.

A checkpoint holds only what the current phase needs (e.g. the student state, both teachers and
the replay set during a global stage). `meta["items"]` lists the items present and
`meta["replay_shape"]` sizes the replay arrays, so restore can build abstract targets first.
Orbax writes each step into a temporary directory and renames it when complete, so a kill leaves
either the old or the new checkpoint. Restore walks the steps newest first and falls back to an
older one when the newest is damaged (Orbax lists damaged steps as valid; JAX_STACK 5).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any
AbstractFn = Callable[[str, dict], PyTree]


def make_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  if max_to_keep < 2:
    raise ValueError("checkpoint.max_to_keep must be >= 2 so a damaged checkpoint can fall back")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(mngr: ocp.CheckpointManager, meta: dict, items: dict[str, PyTree]) -> int:
  """Save `items` + `meta` as the next checkpoint id; returns it. Async: returns after the
  device-to-host copy, so the caller may donate the saved arrays afterwards."""
  ckpt_id = (mngr.latest_step() or 0) + 1
  meta = {**meta, "items": sorted(items), "ckpt_id": ckpt_id}
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  args["meta"] = ocp.args.JsonSave(meta)
  mngr.save(ckpt_id, args=ocp.args.Composite(**args), force=True)
  return ckpt_id


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _restore_items(mngr: ocp.CheckpointManager, step: int, targets: dict[str, PyTree]
                   ) -> dict[str, PyTree]:
  args = {n: ocp.args.StandardRestore(t) for n, t in targets.items()}
  restored = mngr.restore(step, args=ocp.args.Composite(**args)) if args else {}
  return {n: restored[n] for n in targets}


def restore_latest(mngr: ocp.CheckpointManager,
                   abstract_fn: AbstractFn) -> Optional[tuple[dict, dict[str, PyTree]]]:
  """The newest checkpoint that restores cleanly, or None for a fresh workdir.

  Only reading is guarded: a damaged step falls back to an older one, while an error in building
  the restore targets (a bug, or a config that does not match the checkpoint) propagates.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      meta = _read_meta(mngr, step)
    except Exception as e:  # pylint: disable=broad-except  (any damage -> try an older step)
      _warn_damaged(mngr, step, e)
      continue
    targets = {n: abstract_fn(n, meta) for n in meta["items"]}
    try:
      return meta, _restore_items(mngr, step, targets)
    except Exception as e:  # pylint: disable=broad-except
      _warn_damaged(mngr, step, e)
  if steps:
    raise RuntimeError(f"none of the checkpoints {steps} in {mngr.directory} could be restored; "
                       "move the directory away to start the run from scratch")
  return None


def _warn_damaged(mngr: ocp.CheckpointManager, step: int, e: Exception) -> None:
  logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one",
                  step, mngr.directory, type(e).__name__, str(e)[:300])


def abstract_like(tree: PyTree) -> PyTree:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
