"""The issue-5 comparison in one command: PyTorch vs JAX on this machine, interleaved.

  python benchmarks/vs_torch.py --model=digits [--rounds=2] [--repeats=10] [--train-devices=1,2]
      [--set field=value ...]   (passed to the JAX scripts, e.g. --set conv_impl=xla for an A/B)

Each round runs, as separate processes and back to back: `torch_baseline.py` (train step and
DDIM step), `train_step.py` once per train-device count, and `sampler.py`. Machines here
change between sessions and drift within one, so only same-run, interleaved numbers are
compared. Prints one JSON line: every run's seconds per step, the medians, and the speed of
JAX relative to torch (torch s/step / JAX s/step; > 1 means JAX is faster). Needs torch
(`pip install torch==2.13.0`); without it the torch runs report "skipped" and no ratio is given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from hostinfo import host_cpu

HERE = Path(__file__).resolve().parent
# model -> (JAX config arguments shared by train_step.py and sampler.py, train batch,
#           DDIM batch, DDIM steps timed). Batches are torch_baseline.py's defaults.
_TINY = ["--config=configs/digits.py", "--set", "image_size=16", "--set", "in_channels=3",
         "--set", "out_channels=3", "--set", "classifier_hidden=64",
         "--set", "channel_mult=(1,2,2)"]
MODELS = {
    "tiny": (_TINY, 32, 64, 50),
    "digits": (["--config=configs/digits.py"], 64, 64, 250),
    "cifar10": (["--config=configs/cifar10.py"], 8, 16, 5),
}


def run_json(script: str, args: list[str]) -> dict:
  """Run a benchmark script from the repository root; its last stdout line is JSON."""
  done = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent,
                        capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def one_round(model: str, repeats: int, train_devices: list[int],
              overrides: list[str] = ()) -> dict:
  jax_args, batch, ddim_batch, ddim_steps = MODELS[model]
  jax_args = [*jax_args, *[a for o in overrides for a in ("--set", o)]]
  out = {"torch": run_json("torch_baseline.py", [f"--config={model}",
                                                  f"--repeats={repeats}"])}
  for n in train_devices:
    out[f"jax_{n}"] = run_json("train_step.py", [*jax_args, f"--batch={batch}",
                                                 f"--repeats={repeats}",
                                                 "--set", f"mesh.data={n}"])
  out["jax_ddim"] = run_json("sampler.py", [*jax_args, f"--batch={ddim_batch}",
                                            f"--steps={ddim_steps}"])
  return out


def summarize(rounds: list[dict], train_devices: list[int]) -> dict:
  """Medians over rounds and the JAX/torch speed ratios (pure: tested without torch)."""
  def med(key: str, field: str) -> float | None:
    vals = [r[key][field] for r in rounds if field in r[key]]
    return statistics.median(vals) if vals else None

  res = {"torch_sec_per_step": med("torch", "sec_per_step"),
         "torch_sec_per_ddim_step": med("torch", "sec_per_ddim_step"),
         "jax_sec_per_ddim_step": med("jax_ddim", "sec_per_ddim_step")}
  speed = {}
  for n in train_devices:
    res[f"jax_{n}dev_sec_per_step"] = med(f"jax_{n}", "sec_per_step")
    if res["torch_sec_per_step"]:
      speed[f"train_{n}dev"] = res["torch_sec_per_step"] / res[f"jax_{n}dev_sec_per_step"]
  if res["torch_sec_per_ddim_step"]:
    speed["ddim"] = res["torch_sec_per_ddim_step"] / res["jax_sec_per_ddim_step"]
  res["jax_speed_vs_torch"] = speed
  res["matmul_gflops"] = {"torch": [r["torch"].get("matmul_gflops") for r in rounds],
                          "jax": [r[f"jax_{train_devices[0]}"]["matmul_gflops"]
                                  for r in rounds]}
  return res


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", choices=sorted(MODELS), required=True)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--train-devices", default="1,2",
                  help="comma-separated mesh.data values to time the JAX train step with")
  ap.add_argument("--set", action="append", default=[],
                  help="JAX model/config override for train_step.py and sampler.py")
  a = ap.parse_args()
  devices = [int(n) for n in a.train_devices.split(",")]
  rounds = [one_round(a.model, a.repeats, devices, a.set) for _ in range(a.rounds)]
  fields = ("sec_per_step", "sec_per_ddim_step")
  per_run = {k: [{f: r[k][f] for f in fields if f in r[k]} for r in rounds] for k in rounds[0]}
  print(json.dumps({"benchmark": "vs_torch", "model": a.model, "rounds": a.rounds, "overrides": a.set,
                    "per_run": per_run, **summarize(rounds, devices), **host_cpu()}))


if __name__ == "__main__":
  main()
