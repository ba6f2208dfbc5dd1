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
