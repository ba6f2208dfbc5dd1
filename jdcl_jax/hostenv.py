"""Process settings that have to exist before the C runtime starts: glibc malloc tunables.

Why: XLA:CPU allocates each executable's temporaries (66 MB for the digits local step on one
device, 35 MB per device on two) with malloc at every call, and glibc serves and frees
blocks that large with mmap/munmap. Every step then page-faults all of that memory back in
4 KiB pages: 17,000 minor faults per digits step, the kernels that first touch a buffer
paying for them. With `glibc.malloc.hugetlb=1` (glibc >= 2.35; older ones ignore it) malloc
asks for transparent huge pages on those blocks: ~170-1,000 faults a step; the digits local
step ran 0.153 -> 0.143 s on one device and 2-3 % faster on two (benchmarks/README.md).
glibc reads GLIBC_TUNABLES only at process start, hence the re-exec.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JDCL_KEEP_MALLOC"     # set (to anything) to keep the process as it was started


def _sets_hugetlb(tunables: str | None) -> bool:
  return bool(tunables) and "glibc.malloc.hugetlb" in tunables


def huge_pages_requested() -> bool:
  """Whether this process started with a glibc.malloc.hugetlb setting (ours or the user's)."""
  return _sets_hugetlb(os.environ.get("GLIBC_TUNABLES"))


def tunables_with_hugetlb(current: str | None) -> str | None:
  """GLIBC_TUNABLES with the huge-page setting added, or None if it is set already."""
  if _sets_hugetlb(current):
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_huge_pages() -> None:
  """Replace this process by the same command with GLIBC_TUNABLES extended (see module doc).

  A no-op when the setting is already there (so it runs at most once), when OPT_OUT is set,
  or off glibc Linux. Call it first thing, before JAX starts threads or allocates.
  """
  if os.environ.get(OPT_OUT) or platform.system() != "Linux" \
      or platform.libc_ver()[0] != "glibc":
    return
  tunables = tunables_with_hugetlb(os.environ.get("GLIBC_TUNABLES"))
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps interpreter flags and the `-m module` form of the command.
  try:
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
  except OSError:   # no usable interpreter path: run on as started, only slower
    return
