"""Throughput of the jitted augmentation views; prints one JSON line.

  python benchmarks/augment_throughput.py [--batch 256] [--size 32] [--calls 10]

Median images/s over `--calls` timed calls after one warm-up (compile) call,
for the classifier view (flip + pad-crop + RandAugmentMC + Cutout), the
diffusion view (flip + RandomResizedCrop) and the weak view.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jdcl_jax.data import augment  # noqa: E402


def _median_rate(fn, rng, x, calls: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  fn(rng, x).block_until_ready()  # compile + first run
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(calls):
    key = jax.random.fold_in(rng, i)
    t0 = time.perf_counter()
    fn(key, x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return x.shape[0] / statistics.median(times), compile_s


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=3)
  parser.add_argument("--calls", type=int, default=10)
  args = parser.parse_args()
  x = np.random.RandomState(0).randint(
      0, 256, (args.batch, args.size, args.size, args.channels)).astype(np.uint8)
  x = jax.device_put(x)
  rng = jax.random.key(0)
  result = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "batch": args.batch, "shape": list(x.shape[1:])}
  for name, fn in [("classifier_view", augment.classifier_view),
                   ("diffusion_view", augment.diffusion_view),
                   ("weak_view", augment.weak_view)]:
    rate, compile_s = _median_rate(fn, rng, x, args.calls)
    result[f"{name}_img_per_s"] = round(rate, 1)
    result[f"{name}_compile_s"] = round(compile_s, 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
