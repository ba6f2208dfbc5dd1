"""What CPU a benchmark ran on, for its JSON line (no JAX or torch import).

The 2-core machines of this project change between sessions (Zen 5 / Intel AVX-512 / Zen 3
AVX2 were all seen), and XLA:CPU's convolution speed depends on the ISA, so every result
records the model name and the widest vector ISA the kernel reports.
"""
from __future__ import annotations

import os
from pathlib import Path


def host_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
  """{"cpu_model", "cpu_isa" ("avx512" | "avx2" | "other" | "unknown"), "cpu_count"}."""
  try:
    text = Path(cpuinfo).read_text()
  except OSError:
    return {"cpu_model": "unknown", "cpu_isa": "unknown", "cpu_count": os.cpu_count()}
  model, flags = "unknown", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name" and model == "unknown":
      model = value.strip()
    elif key.strip() in ("flags", "Features") and not flags:
      flags = set(value.split())
  isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
  return {"cpu_model": model, "cpu_isa": isa, "cpu_count": os.cpu_count()}
