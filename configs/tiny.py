"""A tiny end-to-end config for tests: digits data, 2 tasks (5 digits each), a very small UNet, few
steps; runs end to end in about a minute on 2 CPU cores. Variants: configs/tiny.py:tasks=5,steps=40."""
from configs import common
from configs import digits


def get_config(arg=None):
  a = common.parse_arg(arg, tasks=2, steps=12)
  c = digits.get_config()
  c.cl.num_tasks = a["tasks"]
  c.model.update(dict(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(), classifier_hidden=32))
  c.local.steps = a["steps"]
  c.local.per_task.t1.steps = a["steps"]
  c.glob.steps = a["steps"]
  c.glob.cls_start_step = a["steps"] // 2
  c.local.batch_size = c.glob.batch_size = 16
  c.replay.samples_per_class = 8
  c.replay.ddim_steps = 4
  c.replay.sample_batch_size = 32
  c.eval.batch_size = 120
  c.log.every_steps = 4
  c.checkpoint.every_steps = 4
  return c
