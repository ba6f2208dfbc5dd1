"""Replay-sampler throughput: python benchmarks/sampler.py --config=configs/digits.py

Times one jitted DDIM program (lax.scan over `--steps` steps) on a batch of `--batch` images and
the t = 0 labelling pass. With --steps < 250 the DDIM-250 rate is extrapolated linearly in the
number of steps and labelled "extrapolated". One JSON line.

Devices as `jdcl_jax.main` sets them: `mesh.cpu_devices` virtual CPU devices, the batch split
over the `mesh.sample_data` sampling mesh (replay and labelling run there in the engine).
"""
import argparse
import functools
import json
import time

import common  # sets sys.path
import jax
import jax.numpy as jnp

from jdcl_jax import sharding
from jdcl_jax.diffusion import sampler, schedule
from jdcl_jax.models import unet


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=250)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dropout", action="store_true", help="sample with dropout (original quirk)")
  ap.add_argument("--set", action="append", default=[], help="model field=value override")
  a = ap.parse_args()
  cfg = common.load_config(a.config)
  common.apply_model_overrides(cfg, a.set)
  sharding.configure_cpu_devices(cfg.mesh.cpu_devices)
  mesh = sharding.make_mesh(cfg.mesh.sample_data)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  mcfg = unet.ModelConfig(**cfg.model.to_dict())
  model = unet.JointUNet(mcfg)
  params = sharding.to_mesh(unet.init_params(mcfg, jax.random.key(0)), mesh)
  ddim = sampler.make_ddim_params(schedule.make_schedule(), a.steps)
  shape = (a.batch, mcfg.image_size, mcfg.image_size, mcfg.in_channels)

  @functools.partial(jax.jit, in_shardings=(repl, repl), out_shardings=data)
  def sample(p, rng):
    eps_fn = lambda x, t, r: model.apply({"params": p}, x, t, train=a.dropout,
                                         rngs={"dropout": r})
    return sampler.ddim_sample(eps_fn, jax.random.normal(rng, shape), ddim, rng)

  label = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                           method=unet.JointUNet.classify).argmax(-1),
                  in_shardings=(repl, data), out_shardings=data)
  t0 = time.perf_counter()
  x = jax.block_until_ready(sample(params, jax.random.key(1)))
  compile_and_first = time.perf_counter() - t0
  sec = common.median_time(lambda: sample(params, jax.random.key(2)), a.repeats, warmup=0)
  label_sec = common.median_time(lambda: label(params, x), 10)
  per_step = sec / a.steps
  print(json.dumps({
      "benchmark": "ddim_sampler", "config": a.config, "batch": a.batch, "ddim_steps": a.steps,
      "sec_per_ddim_step": per_step, "images_per_sec_at_steps": a.batch / sec,
      "ddim250_images_per_sec": a.batch / (per_step * 250),
      "ddim250_is": "measured" if a.steps == 250 else "extrapolated",
      "label_pass_sec": label_sec, "first_call_s": compile_and_first,
      "peak_memory_bytes": common.peak_memory_bytes(), "sample_devices": mesh.shape["data"],
      **common.device_info()}))


if __name__ == "__main__":
  main()
