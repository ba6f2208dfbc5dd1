"""Data-parallel steps over a 2-device CPU mesh equal the single-device result.

Runs in a subprocess: the device count must be set before JAX initialises (JAX_STACK pitfall 12).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

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


SAMPLE_SCRIPT = r"""
import json, jax, numpy as np
from jdcl_jax import sharding
print(json.dumps({"set": sharding.configure_cpu_devices(2), "devices": jax.device_count()}))
from configs import tiny
from jdcl_jax import steps
from jdcl_jax.cl import replay
from jdcl_jax.diffusion import schedule
from jdcl_jax.models import unet

c = tiny.get_config()
mcfg = unet.ModelConfig(**c.model.to_dict())
model, sched = unet.JointUNet(mcfg), schedule.make_schedule()
params = unet.init_params(mcfg, jax.random.key(0))
x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
out = {}
for n in (1, 2):
  mesh = sharding.make_mesh(n)
  gen = replay.make_generate_fn(model, sched, c.replay, (8, 8, 1), mesh)
  p = sharding.to_mesh(params, mesh)
  imgs, logits = gen(p, p, jax.random.key(3))
  ev = jax.jit(lambda p, x: steps.eval_logits(p, x, model=model),
               in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)))
  out[n] = (np.asarray(imgs).astype(int), np.asarray(logits), np.asarray(ev(p, x)),
            len(imgs.sharding.device_set))
print(json.dumps({
    "shards": [out[1][3], out[2][3]],
    "max_pixel_diff": int(np.abs(out[1][0] - out[2][0]).max()),
    "labels_equal": bool((out[1][1].argmax(-1) == out[2][1].argmax(-1)).all()),
    "max_logit_diff": float(np.abs(out[1][1] - out[2][1]).max()),
    "max_eval_diff": float(np.abs(out[1][2] - out[2][2]).max())}))
"""


def test_sampling_mesh_over_virtual_cpu_devices_matches_one_device():
  """mesh.cpu_devices: the virtual devices exist, and sampling/eval split over them agree."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
              "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""})
  done = subprocess.run([sys.executable, "-c", SAMPLE_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [json.loads(l) for l in done.stdout.strip().splitlines()[-2:]]
  assert lines[0] == {"set": 2, "devices": 2}
  res = lines[1]
  assert res["shards"] == [1, 2]
  assert res["labels_equal"]
  assert res["max_pixel_diff"] <= 1, res        # uint8 rounding of float32 noise
  assert res["max_logit_diff"] < 1e-4 and res["max_eval_diff"] < 1e-4, res


def test_cpu_device_count_rules(monkeypatch):
  from jdcl_jax import sharding
  with pytest.raises(ValueError, match="mesh.cpu_devices=-1"):
    sharding.configure_cpu_devices(-1)
  # The user's own XLA flag wins: nothing is changed.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert sharding.configure_cpu_devices(0) == 0
