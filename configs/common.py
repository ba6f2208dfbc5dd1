"""Helpers shared by config files: variant-argument parsing ("tasks=10,steps=100")."""
from typing import Any


def parse_arg(arg: str | None, **defaults: Any) -> dict:
  """Parse `configs/x.py:key=value,...` into a dict typed like `defaults`; unknown keys error."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = type(defaults[key])(value)
  return out


def cifar_model(num_classes: int) -> dict:
  """The CIFAR UNet of spec 1.1 (56.36M / 56.45M parameters with 10 / 100 classes)."""
  return dict(image_size=32, in_channels=3, out_channels=3, model_channels=128,
              channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_resolutions=(2, 4),
              num_heads=4, num_head_channels=-1, dropout=0.1, classifier_hidden=1024,
              num_classes=num_classes)


def paper_logging(c) -> None:
  """Logging/eval cadence shared by the full-size benchmark configs."""
  c.log.every_steps = 100
  c.checkpoint.every_steps = 2000
