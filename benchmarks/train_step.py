"""Train-step throughput: python benchmarks/train_step.py --config=configs/digits.py [--batch=64]

Prints one JSON line: images/s (median of >= 10 steps after warm-up), compile time, peak memory,
FLOPs per step (XLA cost analysis), the fp32 matmul GFLOP/s measured in the same run and the
ratio achieved/matmul. `--stage=global` times the KD step (student + two teachers).
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
  ap.add_argument("--set", action="append", default=[], help="model field=value override")
  a = ap.parse_args()
  cfg = common.load_config(a.config)
  common.apply_model_overrides(cfg, a.set)
  stage_cfg = cfg.local if a.stage == "local" else cfg.glob
  bs = a.batch or stage_cfg.batch_size
  mcfg = unet.ModelConfig(**cfg.model.to_dict())
  model, mesh = unet.JointUNet(mcfg), sharding.make_mesh(-1)
  sched = schedule.make_schedule()
  tx = state_lib.make_optimizer(stage_cfg.weight_decay)
  params = unet.init_params(mcfg, jax.random.key(0))
  st = state_lib.new_state(state_lib.fresh_snapshot(params), tx, stage_cfg.lr)
  static = dict(model=model, tx=tx, sched=sched, cfg=stage_cfg)
  x = np.random.default_rng(0).integers(0, 256, (bs, mcfg.image_size, mcfg.image_size,
                                                 mcfg.in_channels), dtype=np.uint8)
  y = np.arange(bs, dtype=np.int32) % mcfg.num_classes
  rng = jax.random.key(1)
  holder = {"st": st}
  t0 = time.perf_counter()
  if a.stage == "local":
    compiled = steps.jit_step(steps.local_step, mesh, **static).lower(st, x, y, rng).compile()
    flops = common.flops_of(compiled)

    def one():
      holder["st"], m = compiled(holder["st"], x, y, rng)
      return m["loss"]
  else:
    # Teachers + student in sequence on one mesh: the KD step's full cost, no pipelining.
    k = mcfg.num_classes
    old = jnp.arange(k) < k // 2
    gates = (old, ~old, jnp.int32(0), jnp.int32(0))
    fns = steps.jit_global(mesh, mesh, **static)
    step0 = jnp.int32(0)
    inputs_c = fns.inputs_fn.lower(x, y, rng, step0, params, params).compile()
    inputs = inputs_c(x, y, rng, step0, params, params)
    step_c = fns.step_fn.lower(st, inputs, *gates).compile()
    flops = common.flops_of(inputs_c) + common.flops_of(step_c)

    def one():
      holder["st"], m = step_c(holder["st"], inputs_c(x, y, rng, step0, params, params), *gates)
      return m["loss"]
  compile_s = time.perf_counter() - t0

  sec = common.median_time(one, a.repeats)
  mm = common.matmul_gflops()
  achieved = flops / sec / 1e9
  print(json.dumps({
      "benchmark": "train_step", "config": a.config, "stage": a.stage, "batch": bs,
      "params": unet.count_params(mcfg), "conv_impl": mcfg.conv_impl, "dtype": mcfg.dtype,
      "sec_per_step": sec, "images_per_sec": bs / sec, "compile_s": compile_s,
      "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "matmul_gflops": mm,
      "fraction_of_matmul": achieved / mm, "peak_memory_bytes": common.peak_memory_bytes(),
      **common.device_info()}))


if __name__ == "__main__":
  main()
