"""Data-parallel steps over a 2-device CPU mesh equal the single-device result.

Runs in a subprocess: the device count must be set before JAX initialises (JAX_STACK pitfall 12).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).parents[1]

SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from configs import tiny
from jdcl_jax import sharding, state as state_lib, steps
from jdcl_jax.diffusion import schedule
from jdcl_jax.models import unet

c = tiny.get_config()
mcfg = unet.ModelConfig(**c.model.to_dict())
model, sched = unet.JointUNet(mcfg), schedule.make_schedule()
tx = state_lib.make_optimizer(0.01)
params = unet.init_params(mcfg, jax.random.key(0))
x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
y = np.arange(16, dtype=np.int32) % 10
out = {}
for n in (1, 2):
  mesh = sharding.make_mesh(n)
  fn = steps.jit_step(steps.local_step, mesh, model=model, tx=tx, sched=sched, cfg=c.local)
  st = state_lib.new_state(state_lib.fresh_snapshot(params), tx, 2e-4)
  for _ in range(2):
    st, m = fn(st, x, y, jax.random.key(1))
  out[n] = (float(m["loss"]), jax.device_get(st.params))
diff = max(float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[2][1])))
print(json.dumps({"devices": jax.device_count(), "loss1": out[1][0], "loss2": out[2][0],
                  "max_param_diff": diff}))
"""


def test_two_device_mesh_matches_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  res = json.loads(done.stdout.strip().splitlines()[-1])
  assert res["devices"] == 2
  assert abs(res["loss1"] - res["loss2"]) < 1e-5
  assert res["max_param_diff"] < 1e-5
