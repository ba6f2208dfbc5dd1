"""Config files build, validate, and bad values fail with a message naming the field."""
import importlib.util
import json
from pathlib import Path

import pytest

from jdcl_jax import config_check

ROOT = Path(__file__).parents[1]


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg is not None else mod.get_config()


@pytest.mark.parametrize("name,arg", [("default", None), ("digits", None), ("tiny", None),
                                      ("cifar10", None), ("cifar100", "tasks=5"),
                                      ("cifar100", "tasks=10"), ("imagenet100", None)])
def test_configs_validate(name, arg):
  config_check.check_config(load(name, arg))


def test_paper_numbers_in_configs():
  c10 = load("cifar10")
  assert (c10.local.steps, c10.glob.steps, c10.replay.samples_per_class, c10.seed) == (
      50_000, 30_000, 1000, 12)
  assert c10.glob.per_task.t3.lr == 2e-5 and c10.glob.diffusion_view.rrc_scale == (0.64, 1.0)
  c100 = load("cifar100", "tasks=10")
  assert c100.glob.per_task.t9.cls_kd_no_wait and c100.cl.num_tasks == 10
  assert c100.glob.per_task.t2.steps == 100_000 and c100.replay.samples_per_class == 400
  inet = load("imagenet100")
  assert inet.local.init == "prev_global" and inet.model.num_head_channels == 64


def test_unknown_variant_argument():
  with pytest.raises(ValueError, match="unknown config argument"):
    load("cifar100", "taks=10")


@pytest.mark.parametrize("field,value,match", [
    ("method", "nope", "config.method"),
    ("replay.fill", "copy", "config.replay.fill"),
    ("local.steps", 0, "config.local.steps"),
    ("model.conv_impl", "fft", "config.model.conv_impl"),
    ("glob.teacher_buckets", 3, "config.glob.teacher_buckets"),   # 3 does not divide 16
    ("glob.teacher_buckets", 0, "config.glob.teacher_buckets"),
])
def test_bad_values_name_the_field(field, value, match):
  c = load("tiny")
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    config_check.check_config(c)


def test_per_task_override_restricted():
  c = load("tiny")
  c.glob.per_task.t2 = {"batch_size": 8}
  with pytest.raises(ValueError, match="per_task.t2"):
    config_check.check_config(c)
  c = load("tiny")
  c.glob.per_task.t9 = {"lr": 1e-4}
  with pytest.raises(ValueError, match=r"keys are t1\.\.t2"):
    config_check.check_config(c)


def test_workdir_refuses_a_different_config(tmp_path):
  c = load("tiny")
  config_check.check_workdir_config(c, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == c.seed
  c.log.every_steps = 7            # logging changes are allowed on resume
  config_check.check_workdir_config(c, str(tmp_path))
  c.seed = c.seed + 1
  with pytest.raises(ValueError, match="seed"):
    config_check.check_workdir_config(c, str(tmp_path))


@pytest.mark.parametrize("name,arg,count", [("cifar10", None, 56_355_341),
                                            ("cifar100", "tasks=10", 56_447_591),
                                            ("imagenet100", None, 125_613_671)])
def test_config_models_have_the_papers_parameter_counts(name, arg, count):
  from jdcl_jax.models import unet
  cfg = unet.ModelConfig(**load(name, arg).model.to_dict())
  assert unet.count_params(cfg) == count


@pytest.mark.parametrize("field,value,match", [
    ("model.image_size", 16, "image_size"),
    ("model.in_channels", 3, "channels"),
    ("model.num_classes", 12, "classes"),
])
def test_data_model_mismatch_fails_before_compute(tmp_path, field, value, match):
  from jdcl_jax import train
  c = load("tiny")
  section, leaf = field.split(".")
  c[section][leaf] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
