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


def _mixed_tree():
  """Leaves of three dtypes, scalars, device arrays and host arrays, as a run's items have."""
  return {"p": {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.full((2,), 7.5)},
          "step": jnp.asarray(3, jnp.int32), "count": jnp.asarray(9, jnp.int32),
          "img": np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1)}


def test_items_are_packed_one_array_per_dtype(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = _mixed_tree()
  packed = checkpointing.pack(tree)
  assert {k: np.shape(v) for k, v in packed.items()} == {"float32": (14,), "int32": (2,),
                                                         "uint8": (24,)}
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  checkpointing.save(mngr, {"task": 0}, {"state": tree})
  mngr.wait_until_finished()

  def abstract(name, meta):
    assert meta["format"] == checkpointing.PACKED
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)
  _, items = checkpointing.restore_latest(mngr, abstract)
  got = items["state"]
  for want, leaf in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    assert leaf.dtype == want.dtype and leaf.sharding == repl
  mngr.close()


def test_unpack_refuses_a_different_tree():
  packed = {k: np.asarray(v) for k, v in checkpointing.pack(_mixed_tree()).items()}
  other = {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}
  with pytest.raises(ValueError, match="sizes"):
    checkpointing.unpack(packed, other)


def test_typed_keys_are_refused_with_a_clear_error():
  with pytest.raises(TypeError, match="PRNG keys"):
    checkpointing.pack({"k": jax.random.key(0)})


def test_checkpoints_from_before_packing_still_restore(tmp_path):
  """A workdir written by an earlier version (one array per leaf, no "format") resumes."""
  import orbax.checkpoint as ocp
  mngr = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  meta = {"task": 1, "phase": "local", "step": 0, "items": ["state"], "ckpt_id": 1}
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_tree(4.0)),
                                       meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  got_meta, items = checkpointing.restore_latest(mngr, _abstract)
  assert "format" not in got_meta
  np.testing.assert_array_equal(items["state"]["w"], np.full((4, 3), 4.0))
  mngr.close()
