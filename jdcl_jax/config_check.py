"""Validation of the config, the data against it, and a workdir's earlier config.

Every check runs before any compute, and every error names the offending field.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

_CHOICES = {
    "local.kind": ("supervised",),
    "local.init": ("scratch", "prev_global"),
    "replay.sampler": ("ddim", "ddpm"),
    "replay.fill": ("augment", "repeat"),
    "eval.report": ("ema", "raw"),
    "model.conv_impl": ("auto", "xla", "matmul", "winograd"),
    "model.dtype": ("float32", "bfloat16"),
}
_POSITIVE = ("cl.num_tasks", "local.steps", "local.batch_size", "glob.steps", "glob.batch_size",
             "replay.samples_per_class", "replay.ddim_steps", "replay.sample_batch_size",
             "eval.batch_size", "log.every_steps", "checkpoint.every_steps")
# Fields that do not change any number a run produces: a resumed run may change them.
_RESUME_FREE = ("log", "checkpoint", "compilation_cache", "eval.every_steps", "mesh")


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    c = c[part]
  return c


def check_config(c: ml_collections.ConfigDict) -> None:
  # Imported here: the registries pull in the model and data stacks, which config files and
  # these checks do not need.
  from jdcl_jax import methods
  from jdcl_jax.stages import PER_TASK_KEYS
  if c.method not in methods.METHODS:
    raise ValueError(f"config.method={c.method!r} is not one of {sorted(methods.METHODS)}")
  for key, allowed in _CHOICES.items():
    if _get(c, key) not in allowed:
      raise ValueError(f"config.{key}={_get(c, key)!r} is not one of {allowed}")
  for key in _POSITIVE:
    if not int(_get(c, key)) > 0:
      raise ValueError(f"config.{key} must be a positive integer, got {_get(c, key)!r}")
  for stage, allowed in PER_TASK_KEYS.items():
    for name, over in c[stage].per_task.items():
      if not (name.startswith("t") and name[1:].isdigit()
              and 1 <= int(name[1:]) <= c.cl.num_tasks):
        raise ValueError(f"config.{stage}.per_task.{name}: keys are t1..t{c.cl.num_tasks}")
      bad = set(over) - set(allowed)
      if bad:
        raise ValueError(f"config.{stage}.per_task.{name} sets {sorted(bad)}; only {allowed} "
                         "may vary per task (they do not change the compiled step)")
  if c.diffusion.num_timesteps % c.replay.ddim_steps:
    raise ValueError(f"config.replay.ddim_steps={c.replay.ddim_steps} must divide "
                     f"diffusion.num_timesteps={c.diffusion.num_timesteps} (the original spacing)")
  if c.replay.max_generated_factor < 1:
    raise ValueError("config.replay.max_generated_factor must be >= 1")
  if not (c.glob.teacher_buckets >= 1 and c.glob.batch_size % c.glob.teacher_buckets == 0):
    raise ValueError(f"config.glob.teacher_buckets={c.glob.teacher_buckets} must be >= 1 and "
                     f"divide glob.batch_size={c.glob.batch_size}")
  if c.model.num_classes < 2:
    raise ValueError("config.model.num_classes must be >= 2")


def check_data(c: ml_collections.ConfigDict, data: Any) -> None:
  """The dataset must fit the model: image shape, channels and number of classes."""
  h, w, ch = data.x_train.shape[1:]
  m = c.model
  if (h, w) != (m.image_size, m.image_size):
    raise ValueError(f"data images are {h}x{w} but config.model.image_size={m.image_size}")
  if ch != m.in_channels or ch != m.out_channels:
    raise ValueError(f"data images have {ch} channels but config.model.in_channels="
                     f"{m.in_channels}, out_channels={m.out_channels}")
  if data.num_classes != m.num_classes:
    raise ValueError(f"dataset {data.name!r} has {data.num_classes} classes but "
                     f"config.model.num_classes={m.num_classes}")
  if data.num_classes % c.cl.num_tasks:
    raise ValueError(f"{data.num_classes} classes do not split into cl.num_tasks="
                     f"{c.cl.num_tasks} equal tasks")


def _strip(d: dict) -> dict:
  d = json.loads(json.dumps(d))
  for key in _RESUME_FREE:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
      node = node.get(p, {})
    node.pop(parts[-1], None)
  return d


def check_workdir_config(c: ml_collections.ConfigDict, workdir: str,
                         has_checkpoints: bool = True) -> None:
  """Write workdir/config.json, or refuse to resume checkpoints made with a different config."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(c.to_json_best_effort())
  if os.path.exists(path) and has_checkpoints:
    with open(path) as f:
      try:
        earlier = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged ({e}); restore it or use a new workdir") from e
    a, b = _strip(earlier), _strip(current)
    if a != b:
      diff = sorted(k for k in _flat(a).keys() | _flat(b).keys()
                    if _flat(a).get(k) != _flat(b).get(k))
      raise ValueError(f"workdir {workdir} was started with a different config (differs in "
                       f"{diff}); resume with the same config or use a new workdir")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(current, f, indent=1)
  os.replace(tmp, path)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
