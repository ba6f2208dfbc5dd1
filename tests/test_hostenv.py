"""The malloc huge-page re-exec (jdcl_jax/hostenv.py)."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jdcl_jax import hostenv

ROOT = Path(__file__).resolve().parents[1]


def test_tunables_are_extended_once():
  assert hostenv.tunables_with_hugetlb(None) == "glibc.malloc.hugetlb=1"
  assert hostenv.tunables_with_hugetlb("") == "glibc.malloc.hugetlb=1"
  assert (hostenv.tunables_with_hugetlb("glibc.malloc.arena_max=4")
          == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
  assert hostenv.tunables_with_hugetlb("glibc.malloc.hugetlb=0") is None   # the user's choice


_PROBE = ("import os, sys\n"
          "from jdcl_jax import hostenv\n"
          "print('start', flush=True)\n"
          "hostenv.reexec_with_huge_pages()\n"
          "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], sys.flags.dev_mode)\n")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc Linux only")
def test_reexec_keeps_the_command_and_runs_once(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
  env["PYTHONPATH"] = str(ROOT)
  probe = tmp_path / "probe.py"
  probe.write_text(_PROBE)
  out = subprocess.run([sys.executable, "-X", "dev", str(probe), "--flag=1"], env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  if platform.libc_ver()[0] != "glibc":
    assert out == ["start", "tunables None ['--flag=1'] True"]
    return
  # Started twice (the re-exec), the second time with the setting, the same arguments and
  # the same interpreter flags (-X dev).
  assert out == ["start", "start", "tunables glibc.malloc.hugetlb=1 ['--flag=1'] True"]
  env[hostenv.OPT_OUT] = "1"
  out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == ["start", "tunables None [] False"]


def test_huge_pages_requested_reads_the_environment(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert not hostenv.huge_pages_requested()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert hostenv.huge_pages_requested()
