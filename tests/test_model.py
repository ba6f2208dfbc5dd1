"""JointUNet and the PyTorch port: structure, init, dropout, dtypes (CPU, tiny model only)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdcl_jax.models import port, unet

TINY = unet.tiny_model_config()


@pytest.fixture(scope="module")
def params():
  return unet.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def busy_params(params):
  """Fresh params with every leaf perturbed: zero-init layers would hide dropout
  in the ResBlocks and make the decoder output identically 0."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def inputs():
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  return x, jnp.array([3, 700])


def _apply(p, *args, config=TINY, **kwargs):
  return unet.JointUNet(config).apply({"params": p}, *args, **kwargs)


@pytest.mark.parametrize("make, expected", [
    (unet.cifar10_model_config, 56_355_341),
    (unet.cifar100_model_config, 56_447_591),
    (unet.imagenet100_model_config, 125_613_671),
    (unet.tiny_model_config, 1_777_517),
])
def test_param_count(make, expected):
  assert unet.count_params(make()) == expected


@pytest.mark.parametrize("make, expected", [
    (unet.cifar10_model_config, 3712), (unet.imagenet100_model_config, 5568),
    (unet.tiny_model_config, 512)])
def test_feature_dim(make, expected):
  assert unet.feature_dim(make()) == expected
  shapes = unet.param_shapes(make())
  assert shapes["classifier_0"]["kernel"].shape[0] == expected


def test_attention_placement():
  """CIFAR: 15 attention blocks; ImageNet (ds 32/16/8 -> only 8 exists): 8, with 6 heads."""
  for make, n in ((unet.cifar10_model_config, 15), (unet.imagenet100_model_config, 8)):
    flat = traverse_util.flatten_dict(unet.param_shapes(make()))
    assert len({p[0] for p in flat if p[1] == "qkv"}) == n


def test_fresh_init_zero_and_norm_leaves(params):
  flat = traverse_util.flatten_dict(params)
  for path, leaf in flat.items():
    leaf = np.asarray(leaf)
    zero_module = path[-2] in ("out_conv", "proj_out")
    if zero_module:
      assert not leaf.any(), path
    elif path[-2].endswith("norm") or path[-2] == "norm":
      assert np.all(leaf == (1.0 if path[-1] == "scale" else 0.0)), path
    else:
      # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
      kernel = flat[path[:-1] + ("kernel",)]
      bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound, path
  # Zero-init output conv -> eps is exactly 0 for a fresh model, as in the original.
  x = jnp.ones((1, 16, 16, 3))
  assert not np.asarray(_apply(params, x, jnp.array([5]), train=False)).any()


def test_init_is_deterministic(params):
  again = unet.init_params(TINY, jax.random.key(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))


def test_output_shapes(busy_params, inputs):
  x, t = inputs
  eps = _apply(busy_params, x, t, train=False)
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  assert _apply(busy_params, x, train=False, method="classify").shape == (2, 10)
  assert _apply(busy_params, x, t, train=False, method="features").shape == (2, 512)


def test_classify_is_encoder_only_at_t0(busy_params, inputs):
  x, _ = inputs
  logits = _apply(busy_params, x, train=False, method="classify")
  feats = _apply(busy_params, x, jnp.zeros(2), train=False, method="features")
  np.testing.assert_allclose(_apply(busy_params, feats, train=False, method="head"), logits,
                             rtol=1e-6, atol=1e-6)
  # The decoder does not take part: changing it leaves the logits untouched.
  changed = {k: (jax.tree_util.tree_map(lambda a: a + 1.0, v)
                 if k.startswith(("output_blocks", "out_")) else v)
             for k, v in busy_params.items()}
  np.testing.assert_array_equal(_apply(changed, x, train=False, method="classify"), logits)


def test_dropout_switch(busy_params, inputs):
  x, t = inputs
  run = lambda seed, train, **kw: _apply(busy_params, x, *kw.pop("t", ()), train=train,
                                         rngs={"dropout": jax.random.key(seed)}, **kw)
  for kw in ({"t": (t,)}, {"method": "classify"}):
    eval_a, eval_b = run(0, False, **dict(kw)), run(1, False, **dict(kw))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_a2, train_b = (run(0, True, **dict(kw)), run(0, True, **dict(kw)),
                                  run(1, True, **dict(kw)))
    np.testing.assert_array_equal(train_a, train_a2)       # same key, same mask
    assert np.abs(train_a - train_b).max() > 1e-4          # new key, new mask
    assert np.abs(train_a - eval_a).max() > 1e-4


def test_example_dropout_masks_follow_example_index():
  """Rate and scaling as nn.Dropout; example i's mask depends on (key, i) only, so a shard that
  knows its offset on the batch axis draws the rows the whole batch would (data parallelism)."""
  drop = unet.ExampleDropout(0.25)
  rngs = {"dropout": jax.random.key(5)}
  x = jnp.ones((8, 16, 16, 4))
  y = drop.apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1.0 / 0.75], rtol=1e-6)
  assert abs(float(jnp.mean(y == 0.0)) - 0.25) < 0.03
  assert np.any(np.asarray(y[0] != y[1]))                    # examples get different masks
  np.testing.assert_array_equal(drop.apply({}, x[:3], deterministic=False, rngs=rngs), y[:3])
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  # Inside a mapped batch axis of 2 shards of 4, shard k offsets its indices by 4k.
  on_axis = unet.ExampleDropout(0.25, batch_axis="b")
  shards = jax.vmap(lambda xs: on_axis.apply({}, xs, deterministic=False, rngs=rngs),
                    axis_name="b")(x.reshape(2, 4, 16, 16, 4))
  np.testing.assert_array_equal(shards.reshape(y.shape), y)


def test_eval_needs_no_rng(busy_params, inputs):
  x, t = inputs
  _apply(busy_params, x, t, train=False)   # no "dropout" stream: must not raise


def test_bfloat16_compute(busy_params, inputs):
  x, t = inputs
  bf16 = dataclasses.replace(TINY, dtype="bfloat16")
  shapes = unet.param_shapes(bf16)
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(shapes))
  ref = _apply(busy_params, x, t, train=False)
  out = _apply(busy_params, x, t, train=False, config=bf16)
  assert out.dtype == jnp.float32
  assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
  logits = _apply(busy_params, x, train=False, method="classify", config=bf16)
  ref_logits = _apply(busy_params, x, train=False, method="classify")
  assert np.abs(logits - ref_logits).max() <= 0.05 * np.abs(ref_logits).max() + 1e-2


# ----------------------------------------------------------------- port


@pytest.fixture(scope="module")
def state_dict(busy_params):
  return port.params_to_torch_state_dict(busy_params)


def test_port_roundtrip_and_layouts(busy_params, state_dict):
  assert len(state_dict) == 248
  assert state_dict["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 3, 3, 3)
  assert state_dict["model.diffusion_model.input_blocks.4.1.qkv.weight"].shape == (192, 64, 1)
  assert state_dict["model.diffusion_model.time_embed.0.weight"].shape == (128, 32)
  assert state_dict["classifier.3.weight"].shape == (10, 64)
  assert {k: v.shape for k, v in state_dict.items()} == port.torch_param_shapes(TINY)
  back = port.params_from_torch_state_dict(state_dict, TINY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, busy_params)


def test_port_accepts_bare_keys_and_ignores_buffers(busy_params, state_dict):
  bare = {k.removeprefix(port.UNET_PREFIX): v for k, v in state_dict.items()}
  bare["betas"] = np.zeros(1000, np.float32)
  bare["model_ema.num_updates"] = np.zeros((), np.int32)
  bare["old_model.classifier.3.bias"] = np.zeros(10, np.float32)
  back = port.params_from_torch_state_dict(bare, TINY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, busy_params)


def test_port_reads_ema_and_teacher_prefix(busy_params, state_dict):
  doubled = {k: 2 * v for k, v in state_dict.items()}
  full = dict(state_dict)
  full.update({"model_ema." + k.replace(".", ""): v for k, v in doubled.items()})
  full.update({"old_model." + k: v for k, v in doubled.items()})
  twice = jax.tree_util.tree_map(lambda a: 2 * a, busy_params)
  for kw in ({"use_ema": True}, {"key_prefix": "old_model."}):
    got = port.params_from_torch_state_dict(full, TINY, **kw)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, twice)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.diffusion_model.out.2.bias"), r"missing keys \[.*out\.2\.bias"),
    (lambda sd: sd.__setitem__("classifier.9.weight", np.zeros(3)),
     r"unexpected keys \[.*classifier\.9\.weight"),
    (lambda sd: sd.__setitem__("model.diffusion_model.input_blocks.4.1.qkv.weight",
                               np.zeros((192, 64), np.float32)),
     r"input_blocks\.4\.1\.qkv\.weight.*\(192, 64\).*\(192, 64, 1\)"),
    (lambda sd: sd.__setitem__("classifier.0.weight", np.zeros((64, 500), np.float32)),
     r"shape mismatch for 'classifier\.0\.weight'"),
    (lambda sd: sd.__setitem__("out.2.bias", np.zeros(3, np.float32)), r"both with and without"),
])
def test_port_validation_errors(state_dict, edit, match):
  sd = dict(state_dict)
  edit(sd)
  with pytest.raises(ValueError, match=match):
    port.params_from_torch_state_dict(sd, TINY)


def test_port_rejects_wrong_config(state_dict):
  with pytest.raises(ValueError, match="missing keys"):
    port.params_from_torch_state_dict(state_dict, dataclasses.replace(TINY, num_res_blocks=3))


def test_model_config_from_json():
  cfg = {"classifier_hidden": 64, "num_classes": 10, "classifier_in_features": 512,
         "dropout": 0.1, "unet_config": {"params": {
             "image_size": 16, "in_channels": 3, "out_channels": 3, "model_channels": 32,
             "attention_resolutions": [2], "num_res_blocks": 2, "channel_mult": [1, 2, 2],
             "num_heads": 4, "dropout": 0.1, "use_scale_shift_norm": True,
             "pool_size": 10000}}}
  assert port.model_config_from_fixture_json(cfg) == TINY
  with pytest.raises(ValueError, match="classifier_in_features"):
    port.model_config_from_fixture_json({**cfg, "classifier_in_features": 600})
  with pytest.raises(ValueError, match="use_scale_shift_norm"):
    bad = {"params": {**cfg["unet_config"]["params"], "use_scale_shift_norm": False}}
    port.model_config_from_fixture_json({**cfg, "unet_config": bad})
  with pytest.raises(ValueError, match="unet_config"):
    port.model_config_from_fixture_json({"kd": {}})


def test_teacher_recipe_rules():
  keys = ["a.weight", "a.bias", "n.weight", "n.bias"]
  shapes = {"a.weight": (4, 2, 3, 3), "a.bias": (4,), "n.weight": (4,), "n.bias": (4,)}
  sd = port.teacher_state_dict_from_recipe(keys, shapes, seed=3)
  rs = np.random.RandomState(3)
  b = 1 / np.sqrt(18)
  expect = [rs.uniform(-b, b, (4, 2, 3, 3)), rs.uniform(-b, b, (4,)),
            rs.uniform(0.9, 1.1, (4,)), rs.uniform(-0.1, 0.1, (4,))]
  for k, e in zip(keys, expect):
    np.testing.assert_array_equal(sd[k], e.astype(np.float32))
  # A list of shapes aligned with the keys works too.
  sd2 = port.teacher_state_dict_from_recipe(keys, [shapes[k] for k in keys], seed=3)
  np.testing.assert_array_equal(sd2["n.bias"], sd["n.bias"])
