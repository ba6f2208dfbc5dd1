"""Entry point: python -m jdcl_jax.main --config=configs/cifar10.py --workdir=DIR

Re-running the same command resumes from the workdir; a finished run prints its results.
"""
import os

if __name__ == "__main__":
  # First, before JAX loads: restart with malloc on huge pages (fewer page faults on CPU;
  # hostenv.py has the measurements).
  from jdcl_jax import hostenv
  hostenv.reexec_with_huge_pages()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TF is imported by CLU for logging only

import jax  # noqa: E402

from jdcl_jax import sharding, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  # Before any JAX computation: the CPU client is built once, with this many devices.
  sharding.configure_cpu_devices(int(config.mesh.cpu_devices))
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS") \
      or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()      # multi-process: must precede every other JAX call
  # Orbax logs every save at INFO; keep the console for progress and metrics.
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  if config.compilation_cache:
    # Repeat runs (resume after preemption, the same demo twice) skip XLA compiles.
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jdcl_jax/xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
