"""Compile a run's programs in a background thread, in the order the run needs them.

The local step is needed first: it compiles while the main thread initialises the model and
the stage state, instead of after them (digits, 2-core CPU, cold cache: the 50th step came 33 s
after start instead of 54 s; the first stage as a whole was not measurably shorter, its two
cores being busy with the remaining compiles and the steps either way). Evaluation, the replay
generator and the two global-stage programs are needed only after the first local stage;
compiling them on first use stalled the run at task 2 (global step 10.5 s, teachers 3.9 s,
generator 2.2 s), so they compile next, beside the first local stage. All are lowered from
abstract arguments (shapes, dtypes and shardings; nothing is allocated); jit keeps the
executables, so the first real call only traces and finds them.

The abstract arguments must equal what the stages pass, or the real call compiles again
(tests/test_engine.py counts the traces of each program in a whole run). A failure here is
logged and never fails the run: the stage then compiles on first use, as without this module.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdcl_jax import sharding
from jdcl_jax import state as state_lib
from jdcl_jax import steps
from jdcl_jax.diffusion import losses
from jdcl_jax.models import unet

Job = tuple[str, Callable, tuple]


def _key() -> Any:
  # The stages pass keys uncommitted, as jax.random makes them.
  return sharding.abstract(jax.eval_shape(lambda: jax.random.key(0)), None)


def _params(ctx: Any, mesh: jax.sharding.Mesh) -> Any:
  """Model parameters replicated on `mesh`, as `sharding.to_mesh` places them."""
  return sharding.abstract(unet.param_shapes(ctx.model.config), sharding.replicated(mesh))


def _train_state(ctx: Any) -> Any:
  """A stage's TrainState committed to the train mesh (stages._new_state, or a step's output)."""
  return sharding.abstract(state_lib.abstract_state(unet.param_shapes(ctx.model.config), ctx.tx),
                           sharding.replicated(ctx.mesh))


def local_jobs(ctx: Any) -> list[Job]:
  """The local train step, as `stages.local_stage` calls it (state committed to the train
  mesh, the batch split over it, the stage key uncommitted)."""
  bs, x = ctx.config.local.batch_size, ctx.data.x_train
  data = sharding.data_sharded(ctx.mesh)
  return [("local_step", ctx.local_step,
           (_train_state(ctx), jax.ShapeDtypeStruct((bs, *x.shape[1:]), x.dtype, sharding=data),
            jax.ShapeDtypeStruct((bs,), np.int32, sharding=data), _key()))]


def eval_jobs(ctx: Any) -> list[Job]:
  """The evaluation logits program, as `stages.predict` calls it (fixed padded batch)."""
  x = ctx.data.x_test
  batch = jax.ShapeDtypeStruct((ctx.config.eval.batch_size, *x.shape[1:]), x.dtype,
                               sharding=sharding.data_sharded(ctx.sample_mesh))
  return [("eval_logits", ctx.eval_fn, (_params(ctx, ctx.sample_mesh), batch))]


def global_jobs(ctx: Any) -> list[Job]:
  """(name, jitted fn, abstract args) of the inputs program, the teacher program at every
  subset size (steps.teacher_rows) and the student step, as `stages.global_stage` calls them."""
  fns, cfg = ctx.global_fns, ctx.config
  in_data = sharding.data_sharded(fns.inputs_mesh)
  repl = sharding.replicated(ctx.mesh)
  params = _params(ctx, fns.inputs_mesh)
  bs, image = cfg.glob.batch_size, ctx.data.x_train.shape[1:]
  inputs_args = (jax.ShapeDtypeStruct((bs, *image), np.uint8, sharding=in_data),
                 jax.ShapeDtypeStruct((bs,), np.int32, sharding=in_data),
                 _key(), jax.ShapeDtypeStruct((), np.int32))
  student, tin = jax.eval_shape(fns.inputs_fn, *inputs_args)
  teacher_jobs = [
      (f"teacher_targets[{n}]", fns.teacher_fn,
       (params, tin["x_noisy"], tin["t"], tin["x_cls"],
        jax.ShapeDtypeStruct((n,), np.int32, sharding=in_data), tin["keys"][0]))
      for n in steps.teacher_sizes(fns.bucket, fns.inputs_mesh.shape["data"], bs)]
  targets = jax.eval_shape(fns.teacher_fn, *teacher_jobs[-1][2])
  inputs = {**student, "targets": losses.KDTargets(*targets, *targets)}
  k = ctx.model.config.num_classes
  gates = (jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=repl),) * 2 + (
      jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),) * 2
  return [("global_inputs", fns.inputs_fn, inputs_args), *teacher_jobs,
          ("global_step", fns.step_fn, (_train_state(ctx), inputs, *gates))]


def replay_jobs(ctx: Any) -> list[Job]:
  """The replay generator, as `stages.replay_stage` calls it."""
  params = _params(ctx, ctx.sample_mesh)
  return [("generate", ctx.generate_fn, (params, params, _key()))]


def _compile(make_jobs: Callable[[], list[Job]]) -> list[str]:
  try:
    jobs = make_jobs()
  except Exception as e:   # never fail the run: the stages compile on first use instead
    logging.warning("background compile: abstract arguments failed (%s: %s)",
                    type(e).__name__, e)
    return []
  done = []
  for name, fn, args in jobs:
    try:
      fn.lower(*args).compile()
      done.append(name)
    except Exception as e:   # never fail the run: the stage compiles on first use instead
      logging.warning("background compile of %s failed (%s: %s); compiling on first use",
                      name, type(e).__name__, e)
  return done


def start(*groups: Callable[[], list[Job]]) -> tuple[concurrent.futures.Future, ...]:
  """Build each group's jobs and compile them, group after group, on one background thread.

  Returns one future per group; its result is the list of that group's programs compiled, set
  as soon as the group is done, so a stage waits only for the programs it needs. One thread:
  a thread per group measured no faster on the 2-core host (first local stage of the digits
  config 108.7 / 109.2 s with two threads, 114.6 / 104.5 s with one), whose cores are busy
  with compiles and train steps either way.
  """
  futures = tuple(concurrent.futures.Future() for _ in groups)

  def work() -> None:
    for make_jobs, future in zip(groups, futures):
      try:
        future.set_result(_compile(make_jobs))
      except BaseException as e:   # _compile logs its own failures; this is the unexpected
        future.set_exception(e)

  # Not a daemon: a process that ends while XLA is compiling must join the thread first.
  threading.Thread(target=work, name="precompile", daemon=False).start()
  return futures


def wait(future: Optional[concurrent.futures.Future]) -> None:
  """Block until the background compiles are done, so a stage never compiles the same
  program a second time beside them."""
  if future is not None:
    future.result()
