"""Shared helpers of the benchmark scripts (run by hand, not in CI; each prints one JSON line)."""
from __future__ import annotations

import importlib.util
import resource
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jdcl_jax import hostenv  # noqa: E402

hostenv.reexec_with_huge_pages()   # measure the process settings jdcl_jax.main runs with
from hostinfo import host_cpu  # noqa: E402  (this folder is on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def load_config(spec: str):
  """`configs/x.py` or `configs/x.py:arg` -> ConfigDict (same syntax as --config)."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bench_cfg", ROOT / path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def apply_model_overrides(cfg, overrides: list[str]) -> None:
  """`--set field=value` on cfg.model, or `--set section.field=value` on any config section
  (e.g. mesh.data=2): tuples written "(1,2,2)", bools "True"/"False"."""
  for kv in overrides:
    k, v = kv.split("=", 1)
    *path, k = k.split(".")
    node = cfg.model if not path else cfg
    for p in path:
      node = node[p]
    cur = node[k]
    node[k] = (tuple(eval(v)) if isinstance(cur, tuple) else (v == "True")
               if isinstance(cur, bool) else type(cur)(v))


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """The machine's matmul rate (jnp.dot n^3 in `dtype`), measured in the same run."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  sec = median_time(lambda: f(a), repeats)
  return 2 * n ** 3 / sec / 1e9


def matmul_setting(model_dtype: str) -> dict:
  """The yardstick matmul: fp32 2048^3 on CPU (comparable across sessions); on accelerators an
  8192^3 product in the model's compute dtype (2048^3 is too small to reach a GPU's peak), so
  `fraction_of_matmul` reads as utilisation of the measured matrix rate (MFU-like)."""
  if jax.default_backend() == "cpu":
    return {"n": 2048, "dtype": "float32"}
  return {"n": 8192, "dtype": model_dtype}


def peak_memory_bytes() -> int:
  """Peak device memory on accelerators, else the process's peak RSS."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def device_info() -> dict:
  return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "num_devices": jax.device_count(), **host_cpu(),
          "malloc_hugetlb": hostenv.huge_pages_requested()}
