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
      inputs_fn=jax.jit(functools.partial(traced_inputs, model=model, sched=sched, cfg=c.glob)),
      step_fn=jax.jit(functools.partial(traced_step, model=model, tx=tx, sched=sched,
                                        cfg=c.glob)))
  for task, lr in ((1, 2e-4), (2, 2e-5), (3, 2e-4)):
    old = jnp.arange(10) < 2 * task
    new = (jnp.arange(10) >= 2 * task) & (jnp.arange(10) < 2 * task + 2)
    st = state_lib.new_state(state_lib.fresh_snapshot(params), tx, lr)
    for step in range(2):
      inputs = fns.inputs_fn(x, y, steps.stage_rng(0, task, "global"), jnp.int32(step),
                             params, params)
      st, m = fns.step_fn(st, inputs, old, new, jnp.int32(task), jnp.int32(0))
    assert np.isfinite(float(m["loss"]))
    assert float(m["lr"]) == pytest.approx(lr)


def test_global_inputs_equal_the_inline_kd_loss(setup):
  """Teachers computed apart (as the pipelined engine does) give kd_loss's exact numbers."""
  c, model, sched, tx, params, x, y = setup
  other = jax.tree.map(lambda p: p * 0.9, params)
  old, new = jnp.arange(10) < 4, (jnp.arange(10) >= 4) & (jnp.arange(10) < 6)
  rng, step = steps.stage_rng(5, 2, "global"), 3
  inputs = steps.global_inputs(x, y, rng, jnp.int32(step), params, other, model=model,
                               sched=sched, cfg=c.glob)
  kw = dict(old_class_mask_K=old, new_class_mask_K=new, cls_active=True,
            weights=losses.KDWeights(0.01, 1e-5, 1.0, 1e-3), teacher_train=False)
  _, k_loss = jax.random.split(jax.random.fold_in(rng, step))
  batch = {k: inputs[k] for k in ("x_diff", "x_cls", "label")}
  inline, t_inline = losses.kd_loss(model, params, params, other, batch, k_loss, sched, **kw)
  apart, t_apart = losses.kd_terms(model, params, None, None, batch, inputs["t"],
                                   inputs["noise"], inputs["rng"], sched,
                                   targets=inputs["targets"], **kw)
  assert float(inline) == pytest.approx(float(apart), rel=1e-6)
  for name in ("eps_mse_old", "eps_mse_new", "softce_old", "softce_new", "n_old", "n_new"):
    assert float(t_inline[name]) == pytest.approx(float(t_apart[name]), rel=1e-6), name


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
