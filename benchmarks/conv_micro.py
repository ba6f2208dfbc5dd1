"""Conv micro-benchmark: impl="xla" vs "matmul" vs "winograd", forward and forward+backward.

Prints one JSON line. Timings are medians over `--repeats` rounds after a
warm-up; within a round the two implementations run back to back in
alternating order, so load from other processes on a shared machine hits both
alike. The fp32 matmul rate (2048^3 jnp.dot) is measured in the same run, at
the start and at the end, as a yardstick for how loaded the machine was.

  python benchmarks/conv_micro.py [--repeats 12] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdcl_jax.models import conv  # noqa: E402

# (name, batch, size, c_in, c_out, kernel, stride, padding, dtype): the UNet's
# conv kinds at the sizes of the tiny / digits / CIFAR configs.
CASES = [
    ("3x3_64-64_32px_b32", 32, 32, 64, 64, 3, 1, 1, "float32"),
    ("3x3_128-128_32px_b8", 8, 32, 128, 128, 3, 1, 1, "float32"),
    ("3x3_32-32_8px_b64", 64, 8, 32, 32, 3, 1, 1, "float32"),
    ("3x3_64-64_8px_b64", 64, 8, 64, 64, 3, 1, 1, "float32"),
    ("3x3_128-64_8px_b64", 64, 8, 128, 64, 3, 1, 1, "float32"),
    ("3x3_64-64_4px_b64", 64, 4, 64, 64, 3, 1, 1, "float32"),
    ("3x3_256-256_8px_b8", 8, 8, 256, 256, 3, 1, 1, "float32"),
    ("3x3s2_64-64_32px_b32", 32, 32, 64, 64, 3, 2, 1, "float32"),
    ("3x3_3-128_32px_b8", 8, 32, 3, 128, 3, 1, 1, "float32"),
    ("1x1_128-256_16px_b32", 32, 16, 128, 256, 1, 1, 0, "float32"),
    ("3x3_64-64_32px_b32_bf16", 32, 32, 64, 64, 3, 1, 1, "bfloat16"),
]
QUICK = {"3x3_64-64_32px_b32", "3x3_32-32_8px_b64", "3x3_64-64_8px_b64", "3x3s2_64-64_32px_b32",
         "1x1_128-256_16px_b32"}
IMPLS = ("xla", "matmul", "winograd")   # winograd falls back to xla where it does not apply


def _timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int,
                   warmup: int = 2) -> dict[str, float]:
  """Median ms per function; each round runs all of them, order alternating."""
  names = list(fns)
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(fns[n]())
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for n in (names if r % 2 == 0 else names[::-1]):
      times[n].append(_timed(fns[n]))
  return {n: round(1e3 * float(np.median(t)), 3) for n, t in times.items()}


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  ms = interleaved_ms({"mm": lambda: f(a, a)}, repeats)["mm"]
  return round(2 * n ** 3 / (ms / 1e3) / 1e9, 1)


def _programs(impl: str, stride: int, padding: int):
  def fwd(x, w):
    return conv.conv2d(x, w, stride=stride, padding=padding, impl=impl)

  def fwd_bwd(x, w, g):
    y, vjp = jax.vjp(fwd, x, w)
    return (y,) + vjp(g)
  return jax.jit(fwd), jax.jit(fwd_bwd)


def bench_case(case: tuple, repeats: int) -> dict:
  name, b, hw, cin, cout, k, s, p, dtype = case
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (b, hw, hw, cin), dtype)
  w = (jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(dtype)
  ho = (hw + 2 * p - k) // s + 1
  g = jax.random.normal(kg, (b, ho, ho, cout), dtype)
  fns = {}
  for impl in IMPLS:
    fwd, fwd_bwd = _programs(impl, s, p)
    fns[f"{impl}_fwd"] = lambda f=fwd: f(x, w)
    fns[f"{impl}_fwdbwd"] = lambda f=fwd_bwd: f(x, w, g)
  ms = interleaved_ms(fns, repeats)
  flops = 2 * b * ho * ho * cout * k * k * cin
  speedups = {f"{impl}_{kind}_speedup": round(ms[f"xla_{kind}"] / ms[f"{impl}_{kind}"], 2)
              for impl in IMPLS[1:] for kind in ("fwd", "fwdbwd")}
  return {"case": name, **ms, **speedups,
          "xla_fwdbwd_gflops": round(3 * flops / ms["xla_fwdbwd"] / 1e6, 1)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=12)
  parser.add_argument("--quick", action="store_true", help="4 float32 cases")
  args = parser.parse_args()
  cases = [c for c in CASES if not args.quick or c[0] in QUICK]
  gflops_start = matmul_gflops()
  results = [bench_case(c, args.repeats) for c in cases]
  print(json.dumps({
      "benchmark": "conv_micro", "backend": jax.default_backend(),
      "auto_resolves_to": conv.resolve_impl("auto"), "repeats": args.repeats,
      "matmul_gflops_start": gflops_start, "matmul_gflops_end": matmul_gflops(),
      "cases": results}))


if __name__ == "__main__":
  main()
