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
import json, re, jax, jax.numpy as jnp, numpy as np
from configs import tiny
from jdcl_jax import sharding, state as state_lib, steps
from jdcl_jax.diffusion import schedule
from jdcl_jax.models import unet

c = tiny.get_config()
# dropout stays on: masks follow global example indices, so 1 and 2 devices must agree
mcfg = unet.ModelConfig(**c.model.to_dict())
model, sched = unet.JointUNet(mcfg), schedule.make_schedule()
tx = state_lib.make_optimizer(0.01)
params = unet.init_params(mcfg, jax.random.key(0))
x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
# The old classes {0,1,2} fill the first half of the batch and none of the second, so the two
# shards hold different numbers of old/new samples: masked means must be the whole batch's.
y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 3], np.int32)
old, new = jnp.arange(10) < 3, jnp.arange(10) >= 3
gates = (old, new, jnp.int32(0), jnp.int32(0))

def allreduces(compiled):   # element counts of every all-reduced array (XLA may tuple them)
  types = re.findall(r"= (.*?) all-reduce\(", compiled.as_text())
  return sorted(int(n or 1) for t in types for n in re.findall(r"f32\[(\d*)\]", t))

# Adam hides a wrongly scaled gradient, so compare the gradients themselves too.
import functools
from jdcl_jax.diffusion import losses
rs = np.random.default_rng(1)
gbatch = {"x_diff": rs.normal(size=(16, 8, 8, 1)).astype(np.float32),
          "x_cls": rs.normal(size=(16, 8, 8, 1)).astype(np.float32), "label": y,
          "t": rs.integers(0, 1000, 16).astype(np.int32),
          "noise": rs.normal(size=(16, 8, 8, 1)).astype(np.float32)}
local_loss = functools.partial(steps._local_loss, model=model, sched=sched, cls_weight=0.5)
grads = {}

out, ar = {}, {}
for n in (1, 2, "spare"):   # "spare": train on device 0, teachers on device 1 (mesh.data=1)
  mesh = sharding.make_mesh(1 if n == "spare" else n)
  inputs_mesh = sharding.spare_mesh(mesh, sharding.make_mesh(2), 16) if n == "spare" else mesh
  grads[n] = grads[1] if n == "spare" else jax.jit(lambda p, b: steps.data_parallel_grad(
      local_loss, p, b, jax.random.key(3), None, mesh)[1])(params, gbatch)
  fn = steps.jit_step(steps.local_step, mesh, model=model, tx=tx, sched=sched, cfg=c.local)
  st = sharding.to_mesh(state_lib.new_state(state_lib.fresh_snapshot(params), tx, 2e-4), mesh)
  ar[n] = allreduces(fn.lower(st, x, y, jax.random.key(1)).compile())
  for _ in range(2):
    st, m = fn(st, x, y, jax.random.key(1))
  fns = steps.jit_global(mesh, inputs_mesh, model=model, tx=tx, sched=sched, cfg=c.glob)
  teachers = sharding.to_mesh((params, jax.device_get(st.params)), inputs_mesh)   # st donated
  g = sharding.to_mesh(gates, mesh)
  for s in range(2):   # each teacher on its own rows, as stages._global_advance runs them
    student, tin = fns.inputs_fn(x, y, jax.random.key(2), jnp.int32(s))
    targets = steps.dispatch_targets(fns, teachers, tin, y, (np.asarray(old), np.asarray(new)))
    st, gm = fns.step_fn(st, {**student, "targets": targets}, *g)
  out[n] = (jax.device_get(m), jax.device_get(gm), jax.device_get(st.params))
# conv_impl=matmul / winograd (custom-VJP convs) inside the data-parallel shard_map: their
# gradients must keep the per-device (varying) type and equal XLA's convs on one device.
grads_custom = {}
for impl in ("matmul", "winograd"):
  cv_model = unet.JointUNet(unet.ModelConfig(**{**c.model.to_dict(), "conv_impl": impl}))
  cv_loss = functools.partial(steps._local_loss, model=cv_model, sched=sched, cls_weight=0.5)
  grads_custom[impl] = jax.jit(lambda p, b: steps.data_parallel_grad(
      cv_loss, p, b, jax.random.key(3), None, sharding.make_mesh(2))[1])(params, gbatch)
diff = max(float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree.leaves(out[1][2]), jax.tree.leaves(out[2][2])))
print(json.dumps({
    "devices": jax.device_count(),
    "local_terms_diff": max(abs(float(out[1][0][k]) - float(out[2][0][k])) for k in out[1][0]),
    "global_terms_diff": max(abs(float(out[1][1][k]) - float(out[2][1][k])) for k in out[1][1]),
    "spare_global_terms_diff": max(abs(float(out[1][1][k]) - float(out["spare"][1][k]))
                                   for k in out[1][1]),
    "spare_inputs_devices": [d.id for d in inputs_mesh.devices.flat],
    "n_old": [float(out[1][1]["n_old"]), float(out[2][1]["n_old"])],
    "max_param_diff": diff, "allreduce_sizes_2dev": ar[2], "allreduces_1dev": len(ar[1]),
    "max_grad_diff": max(float(np.max(np.abs(a - b))) for a, b in
                         zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[2]))),
    "max_grad_diff_custom_conv": {impl: max(float(np.max(np.abs(a - b))) for a, b in
                                            zip(jax.tree.leaves(grads[1]), jax.tree.leaves(g)))
                                  for impl, g in grads_custom.items()},
    "max_grad": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(grads[1])),
    "num_params": unet.count_params(mcfg)}))
"""


def test_two_device_mesh_matches_one_device():
  """Data-parallel local and global steps (steps.data_parallel_grad) give the one-device
  numbers, and the gradient crosses devices as a single all-reduce of all parameters."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  res = json.loads(done.stdout.strip().splitlines()[-1])
  assert res["devices"] == 2
  assert res["n_old"][0] == res["n_old"][1] == 8.0, res
  assert res["local_terms_diff"] < 1e-5 and res["global_terms_diff"] < 1e-5, res
  # mesh.data=1: the teachers run on the spare device, their outputs move to the train device
  assert res["spare_inputs_devices"] == [1] and res["spare_global_terms_diff"] < 1e-5, res
  assert res["max_param_diff"] < 1e-5, res
  assert res["max_grad"] > 1e-2 and res["max_grad_diff"] < 1e-6, res
  assert sorted(res["max_grad_diff_custom_conv"]) == ["matmul", "winograd"], res
  assert max(res["max_grad_diff_custom_conv"].values()) < 1e-5, res
  assert res["allreduces_1dev"] == 0, res
  big = [n for n in res["allreduce_sizes_2dev"] if n > 1000]
  assert big == [res["num_params"]], res     # one all-reduce carries the whole gradient


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


LOOP_SCRIPT = r"""
import types, jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from jdcl_jax import sharding, stages

mesh = sharding.make_mesh(2)

@jax.jit
def teachers(x):                       # a 2-device program without collectives
  for _ in range(4):
    x = jnp.tanh(x @ x.T @ x * 1e-3)
  return x

def per_shard(x, y):                   # one psum that needs only y, one at the end
  s = jax.lax.psum(jnp.sum(y), "data")
  for _ in range(4):
    x = jnp.tanh(x @ x.T @ x * 1e-3)
  return x + jax.lax.psum(jnp.sum(x), "data") + s
student = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data")),
                                out_specs=P("data")))
y0 = jax.device_put(np.ones((256, 128), np.float32), sharding.data_sharded(mesh))
cache = {"y": y0}

def advance(st, step):   # the shape of stages._global_advance; "metrics" are step outputs
  cache["y"] = teachers(cache["y"] if step % 7 else st.x)
  x = student(st.x, cache["y"])
  return types.SimpleNamespace(step=step + 1, x=x), {"out": x}

cfg = types.SimpleNamespace(log=types.SimpleNamespace(every_steps=1000),
                            checkpoint=types.SimpleNamespace(every_steps=1000))
ctx = types.SimpleNamespace(config=cfg, hooks=(), writer=types.SimpleNamespace(
    write_scalars=lambda *a: None))
st, _ = stages._train_loop(ctx, types.SimpleNamespace(step=0, x=y0), "glob", 0, 120, advance,
                           {"total_steps": 0}, {})
print("finished", st.step, float(jnp.sum(st.x)))
"""


def test_train_loop_never_lets_a_collective_starve():
  """XLA:CPU gives its 2 virtual devices 2 client threads; a dispatch that finds 32 programs
  in flight on a device blocks one, and a collective then waits forever for its other half.
  `stages._train_loop` bounds how far the host runs ahead (MAX_STEPS_AHEAD), so a
  data-parallel loop of collective and plain programs finishes. Unbounded, this loop aborted
  every time on the 2-core host (Termination timeout ... only 1 of them arrived)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=10"}
  done = subprocess.run([sys.executable, "-c", LOOP_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1].startswith("finished")
