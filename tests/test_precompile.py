"""Background compiles: every program compiles from abstract arguments, groups in the order
given, and a failure only logs (the stage then compiles on first use). That the stages' real
calls reuse them is checked over a whole run in test_engine.py (one trace per program)."""
import threading

from absl import logging

from configs import tiny
from jdcl_jax import precompile, train


def test_jdcl_programs_compile_in_background_local_step_first(tmp_path):
  c = tiny.get_config()
  c.compilation_cache = False
  ctx = train._build_context(c, str(tmp_path))
  try:
    futures = train._start_compiles(ctx, {"task": 0, "phase": "local"})
    first, names = futures["local_compile"].result(), futures["background"].result()
  finally:
    ctx.mngr.close()
    ctx.writer.close()
  assert first == ["local_step"]
  # tiny: glob.batch_size 16, 4 teacher buckets -> one teacher program per subset size
  assert names == ["eval_logits", "generate", "global_inputs", "teacher_targets[4]",
                   "teacher_targets[8]", "teacher_targets[12]", "teacher_targets[16]",
                   "global_step"]


def test_each_group_resolves_when_its_own_programs_are_done():
  release = threading.Event()

  class Blocking:
    def lower(self, *args):
      assert release.wait(60)
      return self

    def compile(self):
      return self

  class Quick(Blocking):
    def lower(self, *args):
      return self
  first, second = precompile.start(lambda: [("a", Quick(), ())], lambda: [("b", Blocking(), ())])
  assert first.result(timeout=60) == ["a"]
  assert not second.done()          # the local stage can start while later programs compile
  release.set()
  assert second.result(timeout=60) == ["b"]


def test_resumed_run_orders_the_local_step_by_phase(tmp_path):
  c = tiny.get_config()
  c.compilation_cache = False
  ctx = train._build_context(c, str(tmp_path))
  try:
    at_local = train._start_compiles(ctx, {"task": 0, "phase": "local"})
    last_global = train._start_compiles(ctx, {"task": c.cl.num_tasks - 1, "phase": "global"})
    assert at_local["local_compile"].result() == ["local_step"]
    assert last_global["local_compile"].result() == []     # no local stage is left
    assert at_local["background"].result() == last_global["background"].result()
  finally:
    ctx.mngr.close()
    ctx.writer.close()


def test_failures_are_logged_not_raised(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda *a: warnings.append(a))

  def broken_jobs():
    raise ValueError("no such shape")
  (broken,) = precompile.start(broken_jobs)
  assert broken.result() == []

  class Unlowerable:
    def lower(self, *args):
      raise TypeError("bad argument")
  (failed,) = precompile.start(lambda: [("step", Unlowerable(), ())])
  assert failed.result() == []
  assert len(warnings) == 2 and "no such shape" in str(warnings[0])
  precompile.wait(None)      # no background work: returns at once
