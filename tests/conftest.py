"""Test setup: CPU only, persistent compilation cache (compiles dominate CPU tests)."""
import os
import sys
from pathlib import Path

# Must run before anything imports jax (see shared JAX_STACK pitfall 12).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Config files import `configs.*`: the repository root must be importable.
sys.path.insert(0, str(Path(__file__).parents[1]))

import jax  # noqa: E402

# A persistent cache turns repeated compiles of the same programs (across test
# files and CI runs on the same machine) into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JDCL_TEST_CACHE", os.path.expanduser("~/.cache/jdcl_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
