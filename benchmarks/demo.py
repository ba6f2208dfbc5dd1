"""The digits demo's wall time per stage: python benchmarks/demo.py [--workdir=DIR]

Runs `python -m jdcl_jax.main --config=configs/digits.py` in a fresh workdir (a subprocess, so
process start, imports and compiles count), then prints one JSON line with the total wall time,
the seconds of every stage from results.json, A_T and F_T.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # sets sys.path


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="")
  ap.add_argument("--config", default="configs/digits.py")
  a, overrides = ap.parse_known_args()   # the rest: --config.x=y flags for jdcl_jax.main
  bad = [o for o in overrides if not o.startswith("--config.") and o != "--"]
  if bad:
    ap.error(f"unrecognized arguments: {' '.join(bad)}")
  a.overrides = [o for o in overrides if o != "--"]
  workdir = a.workdir or tempfile.mkdtemp(prefix="jdcl_demo_")
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "jdcl_jax.main", f"--config={a.config}",
                  f"--workdir={workdir}", *a.overrides], cwd=common.ROOT, check=True)
  total = time.time() - t0
  res = json.loads(Path(workdir, "results.json").read_text())
  print(json.dumps({"benchmark": "demo", "config": a.config, "workdir": workdir,
                    "process_wall_s": total, "run_wall_time_s": res["wall_time_s"],
                    "stage_seconds": res["stage_seconds"], "avg_acc": res["avg_acc"],
                    "avg_forgetting": res["avg_forgetting"], "avg_acc_raw": res["avg_acc_raw"],
                    # the run's devices, not this launcher process's (one CPU device)
                    **common.device_info(), "num_devices": res["devices"]["count"],
                    "train_devices": res["devices"]["train"]}))


if __name__ == "__main__":
  main()
