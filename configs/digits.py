"""The embedded offline default: scikit-learn digits (real 8x8 handwritten digits shipped inside
the scikit-learn wheel), 5 tasks x 2 digits, sized to finish on 2 CPU cores in minutes.

The method is JDCL as in configs/cifar10.py; the differences are all for CPU scale (README,
"The digits demo"):
  * 8x8x1 images, a 1.16M-parameter UNet (32 ch, mult (1, 2)), batch 64, hundreds of steps
    instead of 30k-100k; DDIM-50 and 100 replay images per class instead of DDIM-250 and 1000;
  * no flips (digits are not mirror-symmetric), a 1-px crop jitter, no RandAugment at 8 px;
  * stages this short need consistent choices where the original has quirks (spec 8.1.4):
    replay and labels from EMA weights in eval mode, deterministic teachers, an EMA that restarts
    with each stage instead of lagging a whole stage behind, classification terms from step 0;
  * later local models start from G_{k-1} (the ImageNet-100 recipe) so 250 steps suffice; the
    first, from scratch, gets 600 so G_1 generates good replay for the whole chain.
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
    stage.ema_continue = False
  c.local.init = "prev_global"
  c.local.steps = 250
  c.local.per_task.t1 = dict(steps=600)
  c.glob.steps = 400
  c.glob.cls_start_step = 0
  c.glob.teacher_dropout = False
  c.replay.samples_per_class = 100
  c.replay.ddim_steps = 50
  c.replay.sample_batch_size = 200
  c.replay.max_generated_factor = 3.0
  c.replay.fill = "repeat"
  c.replay.sampler_dropout = False
  c.replay.label_dropout = False
  c.replay.label_with_ema = True
  c.eval.batch_size = 360
  c.log.every_steps = 50
  c.checkpoint.every_steps = 200
  # Train data-parallel over every device (on CPU: one virtual device per core,
  # mesh.cpu_devices), like replay sampling, evaluation and the KD teachers. Dropout masks follow
  # global example indices (unet.ExampleDropout), so the device count changes float summation
  # order only (--config.mesh.data=1 trains on one device, the teachers then run a step ahead on
  # the other; seed 12 gave, before the fused dropout / GroupNorm / huge-page / packed-checkpoint
  # changes, the same EMA matrix but one cell, one test image, in 800 s instead
  # of 717 s, same Intel Xeon host and session; benchmarks/README.md). Data-parallel CPU runs
  # once aborted on an XLA:CPU all-reduce timeout; stages.MAX_STEPS_AHEAD is the fix.
  c.mesh.data = -1
  return c
