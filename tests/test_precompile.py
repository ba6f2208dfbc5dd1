"""Background compiles of the later stages' programs: they all compile from abstract arguments,
and a failure only logs (the stage then compiles on first use). That the stages' real calls
reuse them is checked over a whole run in test_engine.py (one trace per program)."""
from absl import logging

from configs import tiny
from jdcl_jax import methods, precompile, train


def test_jdcl_later_programs_compile_in_background(tmp_path):
  c = tiny.get_config()
  c.compilation_cache = False
  ctx = train._build_context(c, str(tmp_path))
  try:
    names = precompile.start(lambda: methods.LATER_PROGRAMS["jdcl"](ctx)).result()
  finally:
    ctx.mngr.close()
    ctx.writer.close()
  # tiny: glob.batch_size 16, 4 teacher buckets -> one teacher program per subset size
  assert names == ["generate", "global_inputs", "teacher_targets[4]", "teacher_targets[8]",
                   "teacher_targets[12]", "teacher_targets[16]", "global_step"]


def test_failures_are_logged_not_raised(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda *a: warnings.append(a))

  def broken_jobs():
    raise ValueError("no such shape")
  assert precompile.start(broken_jobs).result() == []

  class Unlowerable:
    def lower(self, *args):
      raise TypeError("bad argument")
  assert precompile.start(lambda: [("step", Unlowerable(), ())]).result() == []
  assert len(warnings) == 2 and "no such shape" in str(warnings[0])
  precompile.wait(None)      # no background work: returns at once
