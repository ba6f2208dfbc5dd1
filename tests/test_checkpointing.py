"""Checkpoints: round trip, fallback past a damaged newest step, clear error when none is readable."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax import checkpointing


def _tree(v):
  return {"w": jnp.full((4, 3), v, jnp.float32), "n": jnp.asarray(int(v), jnp.int32)}


def _abstract(name, meta):
  del meta
  assert name == "state"
  return checkpointing.abstract_like(_tree(0.0))


def _save_two(tmp_path):
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=3)
  for v in (1.0, 2.0):
    checkpointing.save(mngr, {"task": int(v), "phase": "local", "step": 0}, {"state": _tree(v)})
  mngr.wait_until_finished()
  return mngr


def test_round_trip_restores_newest(tmp_path):
  mngr = _save_two(tmp_path)
  meta, items = checkpointing.restore_latest(mngr, _abstract)
  assert meta["task"] == 2 and meta["items"] == ["state"]
  np.testing.assert_array_equal(items["state"]["w"], np.full((4, 3), 2.0))
  mngr.close()


def test_fresh_workdir_restores_nothing(tmp_path):
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  assert checkpointing.restore_latest(mngr, _abstract) is None
  mngr.close()


def _damage(step_dir: Path):
  for f in step_dir.rglob("*"):
    if f.is_file() and ("manifest" in f.name or f.parent.name == "d" or f.name == "metadata"):
      f.write_bytes(b"\x00" * 3)


def test_damaged_newest_falls_back_to_previous(tmp_path):
  mngr = _save_two(tmp_path)
  mngr.close()
  _damage(tmp_path / "checkpoints" / "2")
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=3)
  meta, items = checkpointing.restore_latest(mngr, _abstract)
  assert meta["task"] == 1
  np.testing.assert_array_equal(items["state"]["w"], np.full((4, 3), 1.0))
  mngr.close()


def test_all_damaged_is_a_clear_error(tmp_path):
  mngr = _save_two(tmp_path)
  mngr.close()
  for step in ("1", "2"):
    _damage(tmp_path / "checkpoints" / step)
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=3)
  with pytest.raises(RuntimeError, match="could be restored"):
    checkpointing.restore_latest(mngr, _abstract)
  mngr.close()


def test_max_to_keep_must_allow_fallback(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpointing.make_manager(str(tmp_path), max_to_keep=1)
