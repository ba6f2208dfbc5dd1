"""The one config schema. Every experiment file imports this and overrides fields.

Task numbers in `per_task` overrides are 1-based, as in the paper ("t3" is the
third task). Override anything on the command line with `--config.x.y=value`.
"""
import ml_collections

placeholder = ml_collections.config_dict.placeholder


def _view_configs(rrc_scale=(0.85, 1.0)):
  """The two views every training image is fed in (spec 5.3)."""
  diffusion = ml_collections.ConfigDict(dict(
      flip=True,                 # horizontal flip, p = 0.5
      rrc_scale=rrc_scale,       # RandomResizedCrop area range; None disables the crop
  ))
  classifier = ml_collections.ConfigDict(dict(
      flip=True,                 # horizontal flip, p = 0.5
      crop_pad=4,                # reflect-pad then random crop; 0 disables
      randaugment=True,          # RandAugmentMC(n=2, m=10), FixMatch variant
      cutout=16,                 # Cutout size in px (16 even at 64 px: original quirk 8.1.8); 0 disables
  ))
  return diffusion, classifier


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                     # drives init, batches, noise, replay; RNG = f(seed, task, stage, step)
  c.method = "jdcl"              # registry in jdcl_jax/methods.py: jdcl | finetune

  # ---- data -------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"       # registry in jdcl_jax/data/sources.py: digits | tfds | npz
  c.data.tfds_name = ""          # cifar10 | cifar100 | imagenet100 (source = tfds)
  c.data.data_dir = placeholder(str)    # TFDS data_dir; None = TFDS default (honours TFDS_DATA_DIR)
  c.data.npz_path = placeholder(str)    # source = npz: file with x_train, y_train, x_test, y_test
  c.data.image_size = 8          # model input size; sources resize/crop to it where documented
  c.data.class_list = placeholder(str)  # imagenet100: WordNet-ID list; None = configs/imagenet100_classes.txt
  c.data.name = placeholder(str)        # display name; None = source/tfds name
  c.data.resize = placeholder(int)      # aspect-changing resize before a centre crop (imagenet100: 76)
  c.data.resize_method = "bilinear"     # bilinear (PIL, antialiased) | nearest
  c.data.train_split = placeholder(str) # None = "train"
  c.data.test_split = placeholder(str)  # None = "test" ("validation" for ImageNet)
  c.data.image_key = placeholder(str)   # None = "image"
  c.data.label_key = placeholder(str)   # None = "label" (CIFAR-100: fine labels)
  c.data.cache_dir = placeholder(str)   # cache decoded TFDS arrays as .npz here (ImageNet: read once)
  c.data.num_classes = placeholder(int) # npz only: expected classes; None = max label + 1

  # ---- continual scenario -------------------------------------------------------------------------
  c.cl = ml_collections.ConfigDict()
  c.cl.num_tasks = 5
  c.cl.class_order_seed = placeholder(int)  # None = native label order (as the paper)

  # ---- model (jdcl_jax.models.unet.ModelConfig) ---------------------------------------------------
  c.model = ml_collections.ConfigDict(dict(
      image_size=8, in_channels=1, out_channels=1, model_channels=32,
      channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,),
      num_heads=4, num_head_channels=-1, dropout=0.1, classifier_hidden=256,
      num_classes=10,
      conv_impl="auto",          # auto: 1x1 convs as matmuls on CPU, XLA elsewhere; winograd = F(2,3) 3x3 convs on CPU (faster on one AVX2 device)
      dtype="float32",           # compute dtype; "bfloat16" for accelerators (params stay f32)
  ))

  # ---- diffusion ----------------------------------------------------------------------------------
  c.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000, beta_start=1e-3, beta_end=2e-2))  # linear beta ("sqrt_linear" in ldm)

  # ---- local stage (plasticity; real data of the current task) -------------------------------------
  c.local = ml_collections.ConfigDict()
  c.local.kind = "supervised"    # registry in jdcl_jax/stages.py: supervised (fixmatch: semi-supervised, next)
  c.local.steps = 500
  c.local.batch_size = 64
  c.local.lr = 2e-4              # constant, AdamW(0.9, 0.999, eps 1e-8), fresh per stage
  c.local.weight_decay = 0.01    # PyTorch AdamW default, on every tensor
  c.local.cls_weight = 1e-3      # lambda_c of spec 3.1
  c.local.ema_decay = 0.9999
  c.local.ema_warmup = True      # decay = min(d, (1+n)/(10+n)) (LitEma); False = constant d
  c.local.init = "scratch"       # scratch | prev_global (ImageNet-100 recipe: params + EMA of G_{k-1})
  c.local.ema_continue = True    # with init=prev_global: continue G_{k-1}'s EMA (faithful) or restart it
  c.local.diffusion_view, c.local.classifier_view = _view_configs((0.85, 1.0))
  c.local.per_task = ml_collections.ConfigDict()   # e.g. {"t1": {"steps": 120000}}

  # ---- replay (generated before each global stage) ------------------------------------------------
  c.replay = ml_collections.ConfigDict()
  c.replay.samples_per_class = 100
  c.replay.sampler = "ddim"      # ddim | ddpm
  c.replay.ddim_steps = 250
  c.replay.eta = 0.0
  c.replay.clip_x0 = False       # original: no x0 clipping in DDIM replay
  c.replay.sample_batch_size = 2000
  c.replay.max_generated_factor = 2.0   # stop after factor * quota * classes generated (original: 2)
  c.replay.fill = "augment"      # deficit fill: augment (flip + RRC copies, original) | repeat
  c.replay.fill_scale_old = (0.90, 1.0)
  c.replay.fill_scale_new = (0.85, 1.0)
  # Spec 8.1.4: the original samples with EMA weights but labels and distils with raw weights, all
  # with dropout active. These four switches reproduce that (faithful = True, True, False, True).
  c.replay.sample_with_ema = True
  c.replay.sampler_dropout = True
  c.replay.label_with_ema = False
  c.replay.label_dropout = True
  c.replay.quantize_uint8 = True  # ToPILImage truncation floor(255 x) of replay images

  # ---- global stage (stability; synthetic data only, two frozen teachers) --------------------------
  c.glob = ml_collections.ConfigDict()
  c.glob.steps = 500
  c.glob.batch_size = 64
  c.glob.lr = 2e-4
  c.glob.weight_decay = 0.01
  c.glob.simple_weight = 0.01    # beta
  c.glob.ce_weight = 1e-5        # gamma
  c.glob.kd_weight = 1.0         # w_kd
  c.glob.cls_kd_weight = 1e-3    # w_cls
  c.glob.cls_start_step = 10000  # classification terms start at this training step (intended semantics, 8.1.3)
  c.glob.cls_kd_no_wait = False  # classifier KD from step 0 (C100-10 t9 no_wait_kl_classification)
  c.glob.pi_weighting = True     # pi_o = 2 n_o / n, pi_n = 2 n_n / n (main); False = plain sum (paper_branch)
  c.glob.teacher_dropout = True  # original teachers stay in train mode (8.1.4)
  c.glob.teacher_buckets = 4     # each teacher runs only on the rows of its own classes (the only
                                 # ones its outputs enter the loss on), per device rounded up to
                                 # batch/4/devices rows; 1 = both on the whole batch, as the original.
                                 # Same targets (tests/test_steps.py); digits KD step 0.163-0.172 ->
                                 # 0.145-0.150 s on 2 CPU cores (steps.teacher_targets)
  c.glob.ema_decay = 0.9999      # LitEma decay of the student, whose counter continues G_{k-1}'s (0.999 in SSL chains)
  c.glob.ema_continue = True     # student continues G_{k-1}'s EMA shadow + counter (faithful, spec 2.3);
                                 # False: restart it (fresh warm-up) so short stages don't lag
  c.glob.diffusion_view, c.glob.classifier_view = _view_configs((0.85, 1.0))
  c.glob.per_task = ml_collections.ConfigDict()

  # ---- evaluation / logging / checkpointing -------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.every_steps = 0         # also evaluate inside stages every N steps (0 = only after stages)
  c.eval.report = "ema"          # which weights results.json's acc_matrix uses: ema | raw

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.profile_steps = 0        # >0: CLU Profile hook captures this many steps once per run

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3   # >= 2 so a damaged latest step can fall back (JAX_STACK 5)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # devices along the data axis of the train steps (-1 = all)
  # Devices for the forward-only work (replay sampling + labelling, evaluation): no gradient
  # all-reduce there, so on CPU it pays to split it over more devices than the train steps use.
  c.mesh.sample_data = -1
  # On the CPU backend: virtual CPU devices to create (0 = one per core, rounded down
  # to a power of two, at most 8; 1 = a single device).
  # XLA:CPU runs each small conv on one thread; one device per core runs the batch shards in
  # parallel (digits DDIM: 1.4-1.6x on 2 cores, benchmarks/README.md). Ignored off CPU and when
  # XLA_FLAGS already sets --xla_force_host_platform_device_count.
  c.mesh.cpu_devices = 0

  c.compilation_cache = True     # persistent XLA cache (in ~/.cache/jdcl_jax/xla): repeat runs skip compiles
  return c
