"""Train-step throughput: python benchmarks/train_step.py --config=configs/digits.py [--batch=64]

Prints one JSON line: images/s (median of >= 10 steps after warm-up), compile time, peak memory,
FLOPs per step (XLA cost analysis), the matmul GFLOP/s measured in the same run (fp32 2048^3
on CPU; 8192^3 in the model's dtype on accelerators) and the ratio achieved/matmul; with
`--peak-tflops`, MFU against that datasheet peak. `--stage=global` times the KD step (student
+ two teachers), the teachers dispatched a step ahead as the engine does
(stages._global_advance), each on the rows of its own classes: labels are uniform over the K
classes, the first `--old-classes` of them old (as in the replay set of task K/2+1 when
K/2 classes are old), `--teacher-buckets` as glob.teacher_buckets.

Devices and meshes as `jdcl_jax.main` sets them: `mesh.cpu_devices` virtual CPU devices,
the train mesh over `mesh.data` of them, the teachers on the spare ones when there are any.
"""
import argparse
import functools
import json
import time

import common  # sets sys.path
import jax
import jax.numpy as jnp
import numpy as np

from jdcl_jax import sharding, state as state_lib, steps
from jdcl_jax.diffusion import schedule
from jdcl_jax.models import unet


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch", type=int, default=0, help="0 = the config's local batch size")
  ap.add_argument("--stage", choices=("local", "global"), default="local")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--old-classes", type=int, default=0, help="global: 0 = half the classes")
  ap.add_argument("--teacher-buckets", type=int, default=0,
                  help="global: 0 = the config's glob.teacher_buckets")
  ap.add_argument("--set", action="append", default=[], help="model field=value override")
  ap.add_argument("--peak-tflops", type=float, default=0.0,
                  help="the device's datasheet peak in the compute dtype; adds an `mfu` field")
  a = ap.parse_args()
  cfg = common.load_config(a.config)
  common.apply_model_overrides(cfg, a.set)
  sharding.configure_cpu_devices(cfg.mesh.cpu_devices)
  stage_cfg = cfg.local if a.stage == "local" else cfg.glob
  bs = a.batch or stage_cfg.batch_size
  mcfg = unet.ModelConfig(**cfg.model.to_dict())
  model, mesh = unet.JointUNet(mcfg), sharding.make_mesh(cfg.mesh.data)
  sched = schedule.make_schedule()
  tx = state_lib.make_optimizer(stage_cfg.weight_decay)
  params = unet.init_params(mcfg, jax.random.key(0))
  st = sharding.to_mesh(state_lib.new_state(state_lib.fresh_snapshot(params), tx, stage_cfg.lr),
                        mesh)
  static = dict(model=model, tx=tx, sched=sched, cfg=stage_cfg)
  x = np.random.default_rng(0).integers(0, 256, (bs, mcfg.image_size, mcfg.image_size,
                                                 mcfg.in_channels), dtype=np.uint8)
  y = np.arange(bs, dtype=np.int32) % mcfg.num_classes
  rng = jax.random.key(1)
  holder, extra = {"st": st}, {}
  t0 = time.perf_counter()
  if a.stage == "local":
    compiled = steps.jit_step(steps.local_step, mesh, **static).lower(st, x, y, rng).compile()
    flops = common.flops_of(compiled)

    def one():
      holder["st"], m = compiled(holder["st"], x, y, rng)
      return m["loss"]
  else:
    k = mcfg.num_classes
    if a.teacher_buckets:
      stage_cfg.teacher_buckets = a.teacher_buckets
    y = np.random.default_rng(0).integers(0, k, bs).astype(np.int32)
    old = np.arange(k) < (a.old_classes or k // 2)
    masks = (old, ~old)
    gates = sharding.to_mesh((jnp.asarray(old), jnp.asarray(~old), jnp.int32(0), jnp.int32(0)),
                             mesh)
    fns = steps.jit_global(mesh, sharding.spare_mesh(mesh, sharding.make_mesh(-1), bs), **static)
    teachers = sharding.to_mesh((params, params), fns.inputs_mesh)
    data_sh = sharding.data_sharded(fns.inputs_mesh)
    step0 = jnp.int32(0)
    xs, ys = jax.device_put(x, data_sh), jax.device_put(y, data_sh)
    shards = fns.inputs_mesh.shape["data"]
    rows = [jax.device_put(steps.teacher_rows(y, m, fns.bucket, shards), data_sh) for m in masks]
    extra = {"teacher_buckets": stage_cfg.teacher_buckets, "old_rows": int(old[y].sum()),
             "teacher_rows": [len(r) for r in rows]}
    inputs_c = fns.inputs_fn.lower(xs, ys, rng, step0).compile()
    student, tin = inputs_c(xs, ys, rng, step0)
    teacher_c = [fns.teacher_fn.lower(teachers[0], tin["x_noisy"], tin["t"], tin["x_cls"],
                                      r, tin["keys"][0]).compile() for r in rows]

    def prepare():
      student, tin = fns.inputs_fn(xs, ys, rng, step0)
      return {**student, "targets": steps.dispatch_targets(fns, teachers, tin, y, masks)}
    holder["next"] = prepare()
    step_c = fns.step_fn.lower(st, holder["next"], *gates).compile()
    flops = common.flops_of(inputs_c) + sum(map(common.flops_of, teacher_c)) + common.flops_of(
        step_c)

    def one():   # step s's teachers were dispatched during step s-1
      # jit (not the AOT executables): it moves the inputs from the teachers' devices.
      inputs, holder["next"] = holder["next"], prepare()
      holder["st"], m = fns.step_fn(holder["st"], inputs, *gates)
      return m["loss"]
  compile_s = time.perf_counter() - t0

  sec = common.median_time(one, a.repeats)
  mm_setting = common.matmul_setting(mcfg.dtype)
  mm = common.matmul_gflops(**mm_setting)
  achieved = flops / sec / 1e9
  mfu = {}   # against a datasheet peak when given (989 = an H100/H200's dense bf16 TFLOP/s)
  if a.peak_tflops > 0:
    mfu = {"peak_tflops": a.peak_tflops, "mfu": achieved / (a.peak_tflops * 1e3)}
  print(json.dumps({
      "benchmark": "train_step", "config": a.config, "stage": a.stage, "batch": bs,
      "params": unet.count_params(mcfg), "conv_impl": mcfg.conv_impl, "dtype": mcfg.dtype,
      "train_devices": mesh.shape["data"],
      "sec_per_step": sec, "images_per_sec": bs / sec, "compile_s": compile_s,
      "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "matmul_gflops": mm,
      "matmul_n": mm_setting["n"], "matmul_dtype": mm_setting["dtype"],
      "fraction_of_matmul": achieved / mm, **mfu, **extra,
      "peak_memory_bytes": common.peak_memory_bytes(),
      **common.device_info()}))


if __name__ == "__main__":
  main()
