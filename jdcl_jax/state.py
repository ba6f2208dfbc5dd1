"""Training state as a pytree, and the EMA rule."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class Snapshot:
  """A trained model as later stages need it: raw weights, EMA shadow and EMA counter."""
  params: PyTree
  ema_params: PyTree
  ema_count: jax.Array        # LitEma `num_updates` (int32 scalar)


@flax.struct.dataclass
class TrainState:
  """Everything a stage's train step updates. The optimizer lives outside (static)."""
  step: jax.Array             # int32 scalar, steps taken in this stage
  params: PyTree
  ema_params: PyTree
  ema_count: jax.Array        # int32 scalar; continues across stages when a student inherits an EMA
  opt_state: PyTree

  def snapshot(self) -> Snapshot:
    return Snapshot(self.params, self.ema_params, self.ema_count)


def make_optimizer(weight_decay: float) -> optax.GradientTransformation:
  """AdamW as torch's default (betas 0.9/0.999, eps 1e-8), decay on every tensor.

  The learning rate is an injected hyperparameter so per-task lr overrides (e.g. CIFAR-10 t3 uses
  2e-5) change a value inside `opt_state` instead of recompiling the step.
  """
  return optax.inject_hyperparams(optax.adamw)(
      learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def new_state(snapshot: Snapshot, tx: optax.GradientTransformation, lr: float) -> TrainState:
  """A stage starts from a snapshot (weights + EMA) with a fresh optimizer (spec 4.5).

  The weights are copied: the train step donates its state, and the snapshot lives on (it is the
  previous global model, a teacher and a checkpoint item).
  """
  snap = jax.tree.map(jnp.copy, snapshot)
  opt_state = tx.init(snap.params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=snap.params,
                    ema_params=snap.ema_params, ema_count=snap.ema_count.astype(jnp.int32),
                    opt_state=opt_state)


def abstract_state(param_shapes: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """Shapes and dtypes of a stage's TrainState (eval_shape: nothing is allocated)."""
  return jax.eval_shape(lambda p: new_state(fresh_snapshot(p), tx, 0.0), param_shapes)


def fresh_snapshot(params: PyTree) -> Snapshot:
  """A newly initialised model: EMA shadow = weights, counter 0 (LitEma at construction)."""
  return Snapshot(params, jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))


def ema_update(ema: PyTree, params: PyTree, count: jax.Array, decay: float,
               warmup: bool) -> tuple[PyTree, jax.Array]:
  """LitEma: n += 1; d = min(decay, (1 + n) / (10 + n)); ema -= (1 - d) (ema - p).

  With `warmup=False` it is FixMatchEma: constant decay and the counter stays put.
  """
  if warmup:
    count = count + 1
    n = count.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  else:
    d = jnp.asarray(decay, jnp.float32)
  new_ema = jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p), ema, params)
  return new_ema, count
