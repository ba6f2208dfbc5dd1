"""The pure parts of the hand-run benchmarks: the host record (benchmarks/hostinfo.py) and the
torch-vs-JAX summary (benchmarks/vs_torch.py). The timed runs themselves are not tests."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name):
  sys.path.insert(0, str(BENCH))      # the scripts import their siblings by name
  try:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  finally:
    sys.path.remove(str(BENCH))


hostinfo = _load("hostinfo")
vs_torch = _load("vs_torch")

_CPUINFO = """processor\t: 0
model name\t: {model}
flags\t\t: fpu sse sse2 {flags}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse sse2 {flags}
"""


def _host(tmp_path, model, flags):
  path = tmp_path / "cpuinfo"
  path.write_text(_CPUINFO.format(model=model, flags=flags))
  return hostinfo.host_cpu(path)


def test_isa_levels(tmp_path):
  assert _host(tmp_path, "Intel(R) Xeon(R)", "avx2 avx512f avx512bw")["cpu_isa"] == "avx512"
  zen3 = _host(tmp_path, "AMD EPYC 7B13", "avx avx2 fma")
  assert zen3 == {"cpu_model": "AMD EPYC 7B13", "cpu_isa": "avx2",
                  "cpu_count": zen3["cpu_count"]}
  assert _host(tmp_path, "old", "sse4_2")["cpu_isa"] == "other"


def test_missing_cpuinfo(tmp_path):
  info = hostinfo.host_cpu(tmp_path / "absent")
  assert info["cpu_model"] == "unknown" and info["cpu_isa"] == "unknown"


def _round(torch_step, jax1, jax2, torch_ddim, jax_ddim):
  return {"torch": {"sec_per_step": torch_step, "sec_per_ddim_step": torch_ddim,
                    "matmul_gflops": 300.0},
          "jax_1": {"sec_per_step": jax1, "matmul_gflops": 310.0},
          "jax_2": {"sec_per_step": jax2, "matmul_gflops": 320.0},
          "jax_ddim": {"sec_per_ddim_step": jax_ddim}}


def test_vs_torch_summary_medians_and_ratios():
  rounds = [_round(0.10, 0.20, 0.10, 0.02, 0.01), _round(0.12, 0.24, 0.08, 0.04, 0.01),
            _round(0.11, 0.22, 0.11, 0.03, 0.03)]
  res = vs_torch.summarize(rounds, [1, 2])
  assert res["torch_sec_per_step"] == pytest.approx(0.11)
  assert res["jax_1dev_sec_per_step"] == pytest.approx(0.22)
  speed = res["jax_speed_vs_torch"]
  assert speed["train_1dev"] == pytest.approx(0.5)      # JAX twice as slow
  assert speed["train_2dev"] == pytest.approx(0.11 / 0.10)
  assert speed["ddim"] == pytest.approx(3.0)
  assert res["matmul_gflops"] == {"torch": [300.0] * 3, "jax": [310.0] * 3}


def test_vs_torch_summary_without_torch():
  """torch_baseline.py prints only {"skipped": ...} without torch: no ratio, no crash."""
  rounds = [_round(0, 0.2, 0.1, 0, 0.01)]
  rounds[0]["torch"] = {"benchmark": "torch_baseline", "skipped": "torch not installed"}
  res = vs_torch.summarize(rounds, [1, 2])
  assert res["torch_sec_per_step"] is None and res["jax_speed_vs_torch"] == {}
  assert res["jax_2dev_sec_per_step"] == pytest.approx(0.1)
