"""End to end on the tiny config: the whole task sequence, results, logs, kill-and-resume."""
import collections
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from jdcl_jax import train

ROOT = Path(__file__).parents[1]
ARG = "tasks=2,steps=40"


def _config():
  c = tiny.get_config(ARG)
  c.compilation_cache = False      # the test session already has its own cache
  return c


TRACES = collections.Counter()     # jitted function name -> traces during `finished_run`


def _count_trace(event, duration, fun_name=None, **kw):
  del duration, kw
  if event == "/jax/core/compile/jaxpr_trace_duration":   # jax._src.dispatch.JAXPR_TRACE_EVENT
    TRACES[fun_name] += 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  jax.monitoring.register_event_duration_secs_listener(_count_trace)
  try:
    return workdir, train.train_and_evaluate(_config(), workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(_count_trace)


def test_each_program_traced_once_per_run(finished_run):
  # Both tasks' local stages, the global stage, replay and every evaluation share one trace
  # (and so one compile) per program. A fresh state that was not committed to the mesh like
  # the step's own outputs once cost a second trace + compile of each train step.
  for name in ("local_step", "global_inputs", "global_step", "_generate", "eval_logits"):
    assert TRACES[name] == 1, (name, dict(TRACES))
  # one trace per teacher-subset size (steps.teacher_rows), all four compiled in the background
  assert TRACES["teacher_targets"] == 4, dict(TRACES)


def test_results_json_and_event_files(finished_run):
  workdir, res = finished_run
  on_disk = json.loads(Path(workdir, "results.json").read_text())
  for key in ("acc_matrix", "avg_acc", "avg_forgetting", "wall_time_s", "config", "seed"):
    assert key in on_disk
  acc = on_disk["acc_matrix"]
  assert acc[0][1] is None and all(0.0 <= v <= 1.0 for row in acc for v in row if v is not None)
  assert on_disk["avg_acc"] == pytest.approx(np.mean(acc[1]))
  assert on_disk["avg_forgetting"] == pytest.approx(acc[0][0] - acc[1][0])
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  dev = on_disk["devices"]
  assert dev["platform"] == "cpu" and dev["processes"] == 1
  assert dev["count"] == jax.device_count() and dev["train"] == dev["count"]   # tiny: mesh.data=-1
  stats = on_disk["replay_stats"]["1"]
  assert sum(stats["old"]["kept"].values()) + sum(stats["old"]["filled"].values()) == 5 * 8


def test_rerun_of_finished_run_only_reports(finished_run, capsys):
  workdir, res = finished_run
  again = train.train_and_evaluate(_config(), workdir)
  assert again["acc_matrix"] == res["acc_matrix"]
  assert "A_T =" in capsys.readouterr().out


def _latest_meta(workdir):
  """The newest finished checkpoint's meta, or None (also while the writer renames/deletes)."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return None
  try:
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step()
    if step is None:
      return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # pylint: disable=broad-except  (a step being written or garbage-collected)
    return None


def _main_cmd(workdir):
  return [sys.executable, "-m", "jdcl_jax.main", f"--config=configs/tiny.py:{ARG}",
          f"--workdir={workdir}", "--config.compilation_cache=False", "--config.mesh.data=-1"]


def test_sigkill_in_global_stage_then_resume_gives_same_matrix(tmp_path):
  """On 2 (virtual CPU) devices with data-parallel train steps (mesh.data=-1), so that path
  runs end to end too: an uninterrupted run, then one killed in its global stage and resumed,
  give the same matrices."""
  workdir = str(tmp_path / "killed")
  # Share the test session's persistent XLA cache so the subprocesses skip most compiles.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  done = subprocess.run(_main_cmd(str(tmp_path / "whole")), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in done.stderr
  reference = json.loads(Path(tmp_path, "whole", "results.json").read_text())
  proc = subprocess.Popen(_main_cmd(workdir), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_meta, deadline = None, time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    meta = _latest_meta(workdir)
    if meta and meta["phase"] == "global" and meta["step"] > 0:
      proc.send_signal(signal.SIGKILL)
      killed_meta = meta
      break
    time.sleep(0.05)
  proc.wait()
  assert killed_meta is not None, "the run ended before it could be killed in a global stage"
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert 0 < killed_meta["step"] < 40
  done = subprocess.run(_main_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = json.loads(Path(workdir, "results.json").read_text())
  assert resumed["acc_matrix_ema"] == reference["acc_matrix_ema"]
  assert resumed["acc_matrix_raw"] == reference["acc_matrix_raw"]
