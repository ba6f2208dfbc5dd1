"""Compile the programs of later stages in a background thread while the first stage trains.

A run needs the local step at once, but the replay generator and the two global-stage programs
only after the first local stage. Compiling them on first use stalls the run at task 2 (on the
2-core CPU host: global step 10.5 s, teachers 3.9 s, generator 2.2 s, cold cache). Here they
are lowered from abstract arguments (shapes, dtypes and shardings; nothing is allocated) and
compiled beside the first local stage; jit keeps the executables, so the first real call only
traces and finds them.

The abstract arguments must equal what the stages pass, or the real call compiles again
(tests/test_engine.py counts the traces of each program in a whole run). A failure here is
logged and never fails the run: the stage then compiles on first use, as without this module.
"""
from __future__ import annotations

import concurrent.futures
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


def global_jobs(ctx: Any) -> list[Job]:
  """(name, jitted fn, abstract args) of the inputs program, the teacher program at every
  subset size (steps.teacher_rows) and the student step, as `stages.global_stage` calls them."""
  fns, mesh, cfg = ctx.global_fns, ctx.mesh, ctx.config
  in_repl, in_data = (sharding.replicated(fns.inputs_mesh),
                      sharding.data_sharded(fns.inputs_mesh))
  repl = sharding.replicated(mesh)
  shapes = unet.param_shapes(ctx.model.config)
  params = sharding.abstract(shapes, in_repl)
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
  state = sharding.abstract(state_lib.abstract_state(shapes, ctx.tx), repl)
  k = ctx.model.config.num_classes
  gates = (jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=repl),) * 2 + (
      jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),) * 2
  return [("global_inputs", fns.inputs_fn, inputs_args), *teacher_jobs,
          ("global_step", fns.step_fn, (state, inputs, *gates))]


def replay_jobs(ctx: Any) -> list[Job]:
  """The replay generator, as `stages.replay_stage` calls it."""
  repl = sharding.replicated(ctx.sample_mesh)
  params = sharding.abstract(unet.param_shapes(ctx.model.config), repl)
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


def start(make_jobs: Callable[[], list[Job]]) -> concurrent.futures.Future:
  """Build the jobs and compile them in order on one background thread. The future's result
  is the list of the programs compiled."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile")
  future = pool.submit(_compile, make_jobs)
  pool.shutdown(wait=False)        # the thread finishes its jobs, then exits
  return future


def wait(future: Optional[concurrent.futures.Future]) -> None:
  """Block until the background compiles are done, so a stage never compiles the same
  program a second time beside them."""
  if future is not None:
    future.result()
