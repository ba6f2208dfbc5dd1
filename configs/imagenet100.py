"""ImageNet-100 at 64x64, 5 tasks x 20 classes (spec section 9, column IN100-5).

Attention resolutions (32, 16, 8) are read as downsample factors, so only ds 8 exists: copied for
parameter-count and compute fidelity (spec 8.1.7). Later local stages start from G_{k-1}.
"""
from configs import common
from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config()
  c.seed = 42
  c.data.source, c.data.tfds_name, c.data.image_size = "tfds", "imagenet100", 64
  c.cl.num_tasks = 5
  c.model.update(dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                      channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                      attention_resolutions=(32, 16, 8), num_heads=4, num_head_channels=64,
                      dropout=0.1, classifier_hidden=2048, num_classes=100))
  c.local.steps, c.local.batch_size = 90_000, 256     # 64 per GPU x 4 GPUs in the original
  c.local.per_task.t1 = dict(steps=120_000)
  c.local.init = "prev_global"
  c.replay.samples_per_class, c.replay.ddim_steps, c.replay.sample_batch_size = 1040, 250, 2000
  c.glob.steps, c.glob.batch_size, c.glob.cls_start_step = 90_000, 256, 10_000
  c.eval.batch_size = 500
  common.paper_logging(c)
  return c
