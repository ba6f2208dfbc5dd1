"""benchmarks/hostinfo.py: the CPU model and vector ISA recorded in every benchmark line."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("hostinfo", ROOT / "benchmarks" / "hostinfo.py")
hostinfo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostinfo)

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
