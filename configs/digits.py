"""The embedded offline default: scikit-learn digits (real 8x8 handwritten digits shipped inside
the scikit-learn wheel), 5 tasks x 2 digits, sized to finish on 2 CPU cores in minutes.

Deviations from the paper recipe, all for CPU scale (see README "The digits demo"):
  * 8x8x1 images, a 1.1M-parameter UNet (32 ch, mult (1, 2)), batch 64, few hundred steps;
  * DDIM with few steps and 100 replay images per class;
  * no flips (digits are not mirror-symmetric), light crops, no RandAugment at 8 px;
  * classification terms of the global stage switch on early (the stage is short).
"""
from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config()
  c.seed = 12
  c.data.source, c.data.image_size = "digits", 8
  c.cl.num_tasks = 5
  c.model.update(dict(image_size=8, in_channels=1, out_channels=1, model_channels=32,
                      channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,),
                      num_heads=4, dropout=0.1, classifier_hidden=256, num_classes=10))
  for stage in (c.local, c.glob):
    stage.batch_size = 64
    stage.diffusion_view.flip = False
    stage.diffusion_view.rrc_scale = None
    stage.classifier_view.flip = False
    stage.classifier_view.crop_pad = 1
    stage.classifier_view.randaugment = False
    stage.classifier_view.cutout = 0
  c.local.steps = 400
  c.glob.steps = 400
  c.glob.cls_start_step = 80
  c.replay.samples_per_class = 100
  c.replay.ddim_steps = 50
  c.replay.sample_batch_size = 200
  c.replay.max_generated_factor = 3.0
  c.replay.fill = "repeat"
  c.eval.batch_size = 360
  c.log.every_steps = 50
  c.checkpoint.every_steps = 200
  return c
