"""CIFAR-10, 5 tasks x 2 classes (spec section 9, column C10-5). Seed 12 as the authors' script.

Prepare the data once (needs TF + internet): see README "Datasets".
"""
from configs import common
from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config()
  c.seed = 12
  c.data.source, c.data.tfds_name, c.data.image_size = "tfds", "cifar10", 32
  c.cl.num_tasks = 5
  c.model.update(common.cifar_model(10))
  c.local.steps, c.local.batch_size = 50_000, 256
  c.replay.samples_per_class, c.replay.ddim_steps, c.replay.sample_batch_size = 1000, 250, 2000
  c.glob.steps, c.glob.batch_size = 30_000, 256
  c.glob.cls_start_step = 10_000
  c.glob.diffusion_view.rrc_scale = (0.64, 1.0)       # CIFAR-10 KD configs use scale 0.64-1
  c.glob.per_task.t3 = dict(lr=2e-5)                  # cifar10_kl_t3.yaml: base_learning_rate 2e-5
  c.eval.batch_size = 1000
  common.paper_logging(c)
  return c
