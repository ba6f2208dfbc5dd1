"""Train steps: one compiled program serves every task (no retrace on new masks, warm-up, lr),
EMA rule, and determinism of the step given (seed, task, stage, step)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jdcl_jax import sharding, state as state_lib, steps
from jdcl_jax.diffusion import schedule
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
  traced = chex.assert_max_traces(steps.global_step, n=1)
  fn = steps.jit_step(traced, sharding.make_mesh(1), 6, model=model, tx=tx, sched=sched,
                      cfg=c.glob)
  for task, lr in ((1, 2e-4), (2, 2e-5), (3, 2e-4)):
    old = jnp.arange(10) < 2 * task
    new = (jnp.arange(10) >= 2 * task) & (jnp.arange(10) < 2 * task + 2)
    st = state_lib.new_state(state_lib.fresh_snapshot(params), tx, lr)
    st, m = fn(st, x, y, steps.stage_rng(0, task, "global"), params, params, old, new,
               jnp.int32(task), jnp.int32(0))
    assert np.isfinite(float(m["loss"]))
    assert float(m["lr"]) == pytest.approx(lr)


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
