"""Train steps: one compiled program serves every task (no retrace on new masks, warm-up, lr),
EMA rule, and determinism of the step given (seed, task, stage, step)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jdcl_jax import sharding, state as state_lib, steps
from jdcl_jax.diffusion import losses, schedule
from jdcl_jax.models import unet


@pytest.fixture(scope="module")
def setup():
  c = tiny.get_config()
  mcfg = unet.ModelConfig(**c.model.to_dict())
  model, sched = unet.JointUNet(mcfg), schedule.make_schedule()
  tx = state_lib.make_optimizer(0.01)
  params = unet.init_params(mcfg, jax.random.key(0))
  x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  y = np.arange(16, dtype=np.int32) % 10
  return c, model, sched, tx, params, x, y


def test_global_step_compiles_once_for_all_tasks(setup):
  c, model, sched, tx, params, x, y = setup
  traced_inputs = chex.assert_max_traces(steps.global_inputs, n=1)
  traced_step = chex.assert_max_traces(steps.global_step, n=1)
  mesh = sharding.make_mesh(1)
  fns = steps.jit_global(mesh, mesh, model=model, tx=tx, sched=sched, cfg=c.glob)
  fns = fns._replace(
      inputs_fn=jax.jit(functools.partial(traced_inputs, sched=sched, cfg=c.glob)),
      step_fn=jax.jit(functools.partial(traced_step, model=model, tx=tx, sched=sched,
                                        cfg=c.glob)))
  for task, lr in ((1, 2e-4), (2, 2e-5), (3, 2e-4)):
    old = np.arange(10) < 2 * task
    new = (np.arange(10) >= 2 * task) & (np.arange(10) < 2 * task + 2)
    # committed, as stages._new_state does (an uncommitted state retraces the step)
    st = sharding.to_mesh(state_lib.new_state(state_lib.fresh_snapshot(params), tx, lr), mesh)
    for step in range(2):
      student, tin = fns.inputs_fn(x, y, steps.stage_rng(0, task, "global"), jnp.int32(step))
      targets = steps.dispatch_targets(fns, (params, params), tin, y, (old, new))
      st, m = fns.step_fn(st, {**student, "targets": targets}, jnp.asarray(old),
                          jnp.asarray(new), jnp.int32(task), jnp.int32(0))
    assert np.isfinite(float(m["loss"]))
    assert float(m["lr"]) == pytest.approx(lr)


def _kd_setup(setup, teacher_buckets, teacher_dropout=False):
  c, model, sched, tx, params, x, y = setup
  cfg = c.glob.copy_and_resolve_references()
  cfg.teacher_buckets, cfg.teacher_dropout = teacher_buckets, teacher_dropout
  mesh = sharding.make_mesh(1)
  return cfg, steps.jit_global(mesh, mesh, model=model, tx=tx, sched=sched, cfg=cfg)


@pytest.mark.parametrize("teacher_buckets,teacher_dropout", [(1, False), (4, False), (4, True)])
def test_teachers_apart_equal_the_inline_kd_loss(setup, teacher_buckets, teacher_dropout):
  """Teachers computed apart, each on its own rows only (as the pipelined engine does), give
  kd_loss's numbers: every loss term, and each teacher's outputs on its own rows. With
  teacher dropout, a subset row draws its batch position's mask, as in the whole batch."""
  c, model, sched, tx, params, x, y = setup
  cfg, fns = _kd_setup(setup, teacher_buckets, teacher_dropout)
  other = jax.tree.map(lambda p: p * 0.9, params)
  old, new = np.arange(10) < 4, (np.arange(10) >= 4) & (np.arange(10) < 6)
  rng, step = steps.stage_rng(5, 2, "global"), 3
  student, tin = steps.global_inputs(x, y, rng, jnp.int32(step), sched=sched, cfg=cfg)
  targets = steps.dispatch_targets(fns, (params, other), tin, y, (old, new))
  kw = dict(old_class_mask_K=old, new_class_mask_K=new, cls_active=True,
            weights=losses.KDWeights(0.01, 1e-5, 1.0, 1e-3), teacher_train=teacher_dropout)
  _, k_loss = jax.random.split(jax.random.fold_in(rng, step))
  batch = {k: student[k] for k in ("x_diff", "x_cls", "label")}
  inline, t_inline = losses.kd_loss(model, params, params, other, batch, k_loss, sched, **kw)
  apart, t_apart = losses.kd_terms(model, params, None, None, batch, student["t"],
                                   student["noise"], student["rng"], sched, targets=targets,
                                   **kw)
  assert float(inline) == pytest.approx(float(apart), rel=1e-5)
  for name in ("eps_mse_old", "eps_mse_new", "softce_old", "softce_new", "n_old", "n_new"):
    assert float(t_inline[name]) == pytest.approx(float(t_apart[name]), rel=1e-5), name
  full = losses.kd_targets(model, params, other, tin["x_noisy"], tin["t"], tin["x_cls"],
                           student["rng"], teacher_dropout)
  for i, mask in ((0, old[y]), (2, new[y])):
    for j in (i, i + 1):                   # eps, then probs, of that teacher
      np.testing.assert_allclose(np.asarray(targets[j])[mask], np.asarray(full[j])[mask],
                                 rtol=1e-5, atol=1e-6)


def test_teacher_rows_cover_each_subset_in_a_few_sizes():
  labels = np.array([0, 3, 1, 1, 2, 0, 3, 3])
  old = np.array([True, True, False, False])          # classes 0, 1
  rows = steps.teacher_rows(labels, old, bucket=2)
  assert rows.tolist() == [0, 2, 3, 5]                 # 4 old rows: exactly 2 buckets
  rows = steps.teacher_rows(labels, ~old, bucket=3)
  assert rows[:4].tolist() == [1, 4, 6, 7] and len(rows) == 6 == len(set(rows.tolist()))
  assert len(steps.teacher_rows(labels, np.zeros(4, bool), bucket=2)) == 2   # never empty
  assert steps.teacher_rows(labels, old, bucket=8).tolist() == [0, 2, 3, 5, 1, 4, 6, 7]
  # two shards of 4 rows (old rows 0,2,3 | 1): per-shard local rows, one common size
  assert steps.teacher_rows(labels, old, bucket=4, num_shards=2).tolist() == [0, 2, 3, 1,
                                                                             1, 0, 2, 3]
  assert steps.teacher_rows(labels, ~old, bucket=2, num_shards=2).tolist() == [1, 0, 2, 0, 2, 3]
  # every length teacher_rows returns is one of teacher_sizes (the shapes compiled ahead)
  rng = np.random.default_rng(0)
  for shards in (1, 2):
    sizes = steps.teacher_sizes(4, shards, 16)
    assert sizes == [4, 8, 12, 16]
    for _ in range(20):
      lab = rng.integers(0, 4, 16)
      assert len(steps.teacher_rows(lab, old, bucket=4, num_shards=shards)) in sizes


def test_rows_outside_a_teachers_subset_are_zero(setup):
  c, model, sched, tx, params, x, y = setup
  cfg, fns = _kd_setup(setup, 4)
  old = np.arange(10) < 3
  _, tin = steps.global_inputs(x, y, steps.stage_rng(0, 2, "global"), jnp.int32(0),
                               sched=sched, cfg=cfg)
  rows = steps.teacher_rows(y, old, fns.bucket)
  eps, probs = fns.teacher_fn(params, tin["x_noisy"], tin["t"], tin["x_cls"],
                              jnp.asarray(rows), tin["keys"][0])
  outside = np.setdiff1d(np.arange(len(y)), rows)
  assert len(outside) > 0
  assert not np.asarray(eps)[outside].any() and not np.asarray(probs)[outside].any()
  np.testing.assert_allclose(np.asarray(probs)[rows].sum(-1), 1.0, rtol=1e-5)


def test_local_step_is_deterministic_and_updates_ema(setup):
  c, model, sched, tx, params, x, y = setup
  fn = steps.jit_step(steps.local_step, sharding.make_mesh(1), model=model, tx=tx, sched=sched,
                      cfg=c.local)
  outs = []
  for _ in range(2):
    st = state_lib.new_state(state_lib.fresh_snapshot(params), tx, 2e-4)
    st, m = fn(st, x, y, steps.stage_rng(3, 1, "local"))
    outs.append((float(m["loss"]), jax.device_get(st.params), int(st.ema_count)))
  assert outs[0][0] == outs[1][0]
  chex.assert_trees_all_equal(outs[0][1], outs[1][1])
  assert outs[0][2] == 1


def test_ema_rule_matches_litema():
  ema, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  new, n = state_lib.ema_update(ema, p, jnp.int32(0), 0.9999, True)
  # n = 1 -> decay min(0.9999, 2/11); ema = 0 - (1 - 2/11)(0 - 1)
  np.testing.assert_allclose(new["w"], 1 - 2 / 11, rtol=1e-6)
  assert int(n) == 1
  new, n = state_lib.ema_update(ema, p, jnp.int32(5), 0.999, False)
  np.testing.assert_allclose(new["w"], 1e-3, rtol=1e-4)
  assert int(n) == 5
