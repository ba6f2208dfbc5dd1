"""Augmentation throughput: python benchmarks/augment_throughput.py [--batch 256 --size 32]

Images/s of the jitted views on one batch of random uint8 images: the classifier view
(flip + reflect-pad crop + RandAugmentMC + Cutout), the diffusion view (flip +
RandomResizedCrop) and the FixMatch weak view. Median over `--repeats` calls after
warm-up (compile time reported separately). One JSON line.
"""
import argparse
import json
import os
import time

import common  # sets sys.path
import jax
import numpy as np

from jdcl_jax.data import augment


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--channels", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=10)
  a = ap.parse_args()
  x = np.random.RandomState(0).randint(0, 256, (a.batch, a.size, a.size, a.channels))
  x = jax.device_put(x.astype(np.uint8))
  out = {"bench": "augment_throughput", "backend": jax.default_backend(),
         "batch": a.batch, "image": [a.size, a.size, a.channels],
         "load_avg_1m": round(os.getloadavg()[0], 2)}  # CPU numbers depend on other load
  for name, view in [("classifier_view", augment.classifier_view),
                     ("diffusion_view", augment.diffusion_view),
                     ("weak_view", augment.weak_view)]:
    keys = iter(jax.random.split(jax.random.key(0), a.repeats + 10))
    t0 = time.perf_counter()
    jax.block_until_ready(view(next(keys), x))
    out[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
    sec = common.median_time(lambda: view(next(keys), x), a.repeats, warmup=1)
    out[f"{name}_img_per_s"] = round(a.batch / sec, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
