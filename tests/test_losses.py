"""Losses: math on a fake joint model, then every term against losses_golden.npz.

Golden tolerance: atol 1e-6 on every scalar (reference README section 7; the
PyTorch float32 noise floor is 2.4e-7). The fixture ran in eval mode, so the
golden calls use train=False and teacher_train=False.
"""
import json
import os
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdcl_jax.diffusion import losses, schedule

REF_DIR = Path(os.environ.get("JDCL_REFERENCE_DIR",
                              Path(__file__).resolve().parents[2] / "shared" / "reference"))
K = 4
WEIGHTS = losses.KDWeights(simple=0.01, ce=1e-5, kd=1.0, cls_kd=1e-3)


def _load(name):
  path = REF_DIR / name
  if not path.exists():
    pytest.skip(f"golden fixture {path} not found")
  return np.load(path, allow_pickle=False)


class FakeJoint(nn.Module):
  """JointUNet's interface on a handful of parameters (eps pass + classify at t = 0)."""

  def setup(self):
    self.conv = nn.Conv(3, (3, 3))
    self.temb = nn.Dense(3)
    self.head = nn.Dense(K)
    self.drop = nn.Dropout(0.3)

  def _h(self, x, t, train):
    emb = self.temb(jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 5)))
    return self.drop(jnp.tanh(self.conv(x) + emb[:, None, None]), deterministic=not train)

  def __call__(self, x, t, *, train):
    return self._h(x, t, train)

  def classify(self, x, *, train):
    return self.head(jnp.mean(self._h(x, jnp.zeros((x.shape[0],)), train), axis=(1, 2)) * 5.0)


def _init(model, seed):
  x = jnp.zeros((1, 6, 6, 3))
  both = lambda m, x: (m(x, jnp.zeros((1,)), train=False), m.classify(x, train=False))
  return model.init(jax.random.key(seed), x, method=both)["params"]


@pytest.fixture(scope="module")
def setup():
  model = FakeJoint()
  params, old, new = (_init(model, s) for s in (0, 1, 2))
  ks = jax.random.split(jax.random.key(10), 4)
  batch = {"x_diff": jax.random.uniform(ks[0], (8, 6, 6, 3), minval=-1, maxval=1),
           "x_cls": jax.random.uniform(ks[1], (8, 6, 6, 3), minval=-1, maxval=1),
           "label": jnp.asarray([0, 1, 2, 3, 2, 3, 2, 0], jnp.int32)}
  t = jnp.asarray([0, 1, 10, 100, 250, 500, 750, 999], jnp.int32)
  noise = jax.random.normal(ks[2], batch["x_diff"].shape)
  return model, params, old, new, batch, t, noise, schedule.make_schedule()


def _np_ce(logits, labels):
  lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return -lsm[np.arange(len(labels)), labels], lsm


def _apply(model, params, *args, **kw):
  return np.asarray(model.apply({"params": params}, *args, train=False, **kw), np.float64)


def test_local_terms_match_manual(setup):
  model, params, _, _, batch, t, noise, sched = setup
  loss, terms = losses.local_terms(model, params, batch, t, noise, jax.random.key(0), sched,
                                   cls_weight=1e-3, train=False)
  x_noisy = schedule.q_sample(sched, batch["x_diff"], t, noise)
  eps = _apply(model, params, x_noisy, t)
  simple = np.mean((eps - np.asarray(noise)) ** 2)
  ce, _ = _np_ce(_apply(model, params, batch["x_cls"], method="classify"),
                 np.asarray(batch["label"]))
  np.testing.assert_allclose(terms["simple"], simple, rtol=1e-6)
  np.testing.assert_allclose(terms["ce"], ce.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, simple + 1e-3 * ce.mean(), rtol=1e-6)
  assert terms["total"] == loss


def _kd_manual(model, params, old, new, batch, t, noise, sched, old_classes, new_classes):
  """KD terms with boolean indexing, as the original computes them."""
  y = np.asarray(batch["label"])
  x_noisy = schedule.q_sample(sched, batch["x_diff"], t, noise)
  eps, logits = _apply(model, params, x_noisy, t), _apply(model, params, batch["x_cls"],
                                                          method="classify")
  _, lsm = _np_ce(logits, y)
  out = {}
  for role, teacher, classes in (("old", old, old_classes), ("new", new, new_classes)):
    m = np.isin(y, classes)
    if not m.any():
      out[f"eps_mse_{role}"] = out[f"softce_{role}"] = 0.0
      continue
    e_t = _apply(model, teacher, x_noisy[m], t[m])
    tl = _apply(model, teacher, batch["x_cls"][m], method="classify")
    p = np.exp(tl - tl.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[f"eps_mse_{role}"] = np.mean((eps[m] - e_t) ** 2)
    out[f"softce_{role}"] = np.mean(-(p * lsm[m]).sum(-1))
  n_o, n_n = np.isin(y, old_classes).sum(), np.isin(y, new_classes).sum()
  out["pi_old"], out["pi_new"] = 2 * n_o / (n_o + n_n), 2 * n_n / (n_o + n_n)
  return out


def _class_mask(classes):
  return jnp.zeros((K,), bool).at[jnp.asarray(classes, jnp.int32)].set(True)


@pytest.mark.parametrize("old_classes,new_classes", [([0, 1], [2, 3]), ([0], [1, 2, 3]),
                                                     ([], [0, 1, 2, 3])])
def test_kd_terms_match_boolean_indexing(setup, old_classes, new_classes):
  model, params, old, new, batch, t, noise, sched = setup
  loss, terms = losses.kd_terms(
      model, params, old, new, batch, t, noise, jax.random.key(0), sched,
      new_class_mask_K=_class_mask(new_classes), old_class_mask_K=_class_mask(old_classes),
      cls_active=True, weights=WEIGHTS, teacher_train=False, train=False)
  want = _kd_manual(model, params, old, new, batch, t, noise, sched, old_classes, new_classes)
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  diff_kd = want["pi_new"] * want["eps_mse_new"] + want["pi_old"] * want["eps_mse_old"]
  cls_kd = 1e-3 * (want["pi_new"] * want["softce_new"] + want["pi_old"] * want["softce_old"])
  np.testing.assert_allclose(loss, 0.01 * terms["simple"] + 1e-5 * terms["ce"] + diff_kd
                             + cls_kd, rtol=1e-5)
  assert all(np.isfinite(float(v)) for v in terms.values())


def test_kd_cls_gate_and_gradients(setup):
  model, params, old, new, batch, t, noise, sched = setup
  kw = dict(new_class_mask_K=_class_mask([2, 3]), old_class_mask_K=_class_mask([0, 1]),
            weights=WEIGHTS, teacher_train=False, train=False)

  def f(p, o, n, active):
    return losses.kd_terms(model, p, o, n, batch, t, noise, jax.random.key(0), sched,
                           cls_active=active, **kw)
  (loss, terms), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
      params, old, new, 0.0)
  assert terms["ce_weighted"] == 0 and terms["classifier_kd"] == 0
  assert terms["ce"] > 0 and terms["softce_old"] > 0   # still computed, for logging
  chex.assert_trees_all_close(grads[0]["head"], jax.tree.map(jnp.zeros_like, params["head"]))
  for teacher_grads in grads[1:]:   # teachers are frozen targets
    chex.assert_trees_all_close(teacher_grads, jax.tree.map(jnp.zeros_like, teacher_grads))
  (_, on), g_on = jax.value_and_grad(f, has_aux=True)(params, old, new, 1.0)
  assert on["classifier_kd"] > 0 and float(jnp.abs(g_on["head"]["kernel"]).max()) > 0


def test_kd_separate_logit_kd_gate_pi_off_and_dict_weights(setup):
  model, params, old, new, batch, t, noise, sched = setup
  _, terms = losses.kd_terms(
      model, params, old, new, batch, t, noise, jax.random.key(0), sched,
      new_class_mask_K=_class_mask([2, 3]), old_class_mask_K=_class_mask([0, 1]),
      cls_active=False, cls_kd_active=True, weights=WEIGHTS._asdict(), teacher_train=False,
      train=False, pi_weighting=False)
  assert terms["ce_weighted"] == 0 and terms["classifier_kd"] > 0   # no_wait_kl_classification
  assert terms["pi_old"] == 1 and terms["pi_new"] == 1               # paper_branch plain sum
  np.testing.assert_allclose(terms["diffusion_kd"], terms["eps_mse_old"] + terms["eps_mse_new"],
                             rtol=1e-6)
  np.testing.assert_allclose(terms["classifier_kd"],
                             1e-3 * (terms["softce_old"] + terms["softce_new"]), rtol=1e-6)


def test_kd_jit_no_retrace_across_tasks(setup):
  model, params, old, new, batch, t, noise, sched = setup

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, new_mask, old_mask, active, rng):
    return losses.kd_loss(model, p, old, new, batch, rng, sched, new_class_mask_K=new_mask,
                          old_class_mask_K=old_mask, cls_active=active, weights=WEIGHTS,
                          teacher_train=True)
  a, _ = step(params, _class_mask([1]), _class_mask([0]), False, jax.random.key(0))
  b, _ = step(params, _class_mask([2, 3]), _class_mask([0, 1]), True, jax.random.key(0))
  assert np.isfinite(float(a)) and float(a) != float(b)


def test_teacher_train_flag_uses_dropout(setup):
  model, params, old, new, batch, t, noise, sched = setup

  def terms(teacher_train, seed):
    return losses.kd_terms(model, params, old, new, batch, t, noise, jax.random.key(seed),
                           sched, new_class_mask_K=_class_mask([2, 3]),
                           old_class_mask_K=_class_mask([0, 1]), cls_active=True,
                           weights=WEIGHTS, teacher_train=teacher_train, train=False)[1]
  assert terms(False, 0)["eps_mse_old"] == terms(False, 1)["eps_mse_old"]
  assert terms(True, 0)["eps_mse_old"] != terms(True, 1)["eps_mse_old"]


def _fixmatch_batch(batch):
  x_u = batch["x_diff"]
  return {"x_cls": batch["x_cls"][:2], "label": batch["label"][:2], "x_diff": x_u,
          "x_weak": x_u * 0.9, "x_strong": -x_u}


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.01])
def test_fixmatch_terms_match_manual(setup, threshold):
  model, params, _, _, batch, t, noise, sched = setup
  fb = _fixmatch_batch(batch)
  loss, terms = losses.fixmatch_terms(model, params, fb, t, noise, jax.random.key(0), sched,
                                      cls_weight=1e-3, threshold=threshold, train=False)
  logit = lambda x: _apply(model, params, x, method="classify")
  ce_l, _ = _np_ce(logit(fb["x_cls"]), np.asarray(fb["label"]))
  lw = logit(fb["x_weak"])
  p = np.exp(lw - lw.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  mask = p.max(-1) >= threshold
  ce_s, _ = _np_ce(logit(fb["x_strong"]), p.argmax(-1))
  np.testing.assert_allclose(terms["ce_sup"], ce_l.mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["fixmatch"], (mask * ce_s).sum() / 8, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(terms["mask_rate"], mask.mean())
  np.testing.assert_allclose(loss, terms["simple"] + 1e-3 * (ce_l.mean() + terms["fixmatch"]),
                             rtol=1e-5)
  assert 0 < threshold < 1 or terms["mask_rate"] in (0.0, 1.0)


def test_fixmatch_pseudo_labels_carry_no_gradient(setup):
  model, params, _, _, batch, t, noise, sched = setup
  fb = _fixmatch_batch(batch)
  g = jax.grad(lambda p: losses.fixmatch_terms(model, p, fb, t, noise, jax.random.key(0), sched,
                                               cls_weight=1.0, threshold=0.0,
                                               train=False)[1]["fixmatch"])(params)
  pseudo = jnp.argmax(model.apply({"params": params}, fb["x_weak"], train=False,
                                  method="classify"), -1)

  def strong_only(p):   # the same loss with fixed pseudo-labels
    logits = model.apply({"params": p}, fb["x_strong"], train=False, method="classify")
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), pseudo[:, None], 1))
  chex.assert_trees_all_close(g, jax.grad(strong_only)(params), rtol=1e-5, atol=1e-7)


def test_wrappers_draw_t_and_noise(setup):
  model, params, old, new, batch, t, noise, sched = setup
  run = jax.jit(lambda r: losses.local_loss(model, params, batch, r, sched, cls_weight=1e-3)[0])
  a, a2, b = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  assert a == a2 and a != b
  fm = losses.fixmatch_loss(model, params, _fixmatch_batch(batch), jax.random.key(0), sched,
                            cls_weight=1e-3, threshold=0.95)[0]
  assert np.isfinite(float(fm))


# ------------------------------------------------------------------ golden


@pytest.fixture(scope="module")
def golden():
  from jdcl_jax.models import port, unet
  z, u = _load("losses_golden.npz"), _load("unet_tiny_golden.npz")
  config = port.model_config_from_fixture_json(json.loads(str(u["config_json"])))
  keys = list(u["param_keys"])
  student = port.params_from_torch_state_dict({k: u[k] for k in keys}, config)
  shapes = {k: u[k].shape for k in keys}
  teachers = {}
  for role, seed in json.loads(str(z["config_json"]))["teacher_seeds"].items():
    sd = port.teacher_state_dict_from_recipe(list(z["teacher_param_keys"]), shapes, seed)
    np.testing.assert_array_equal([sd[k].astype(np.float64).sum() for k in keys],
                                  z[f"teacher_{role}_param_sum_f64"])
    teachers[role] = port.params_from_torch_state_dict(sd, config)
  batch = {"x_diff": jnp.asarray(z["x_w_nhwc"]), "x_cls": jnp.asarray(z["x_s_nhwc"]),
           "label": jnp.asarray(z["y"], jnp.int32)}
  t, noise = jnp.asarray(z["t"], jnp.int32), jnp.asarray(z["noise_nhwc"])
  return z, unet.JointUNet(config), student, teachers, batch, t, noise


def test_local_loss_golden(golden):
  z, model, student, _, batch, t, noise = golden
  with jax.default_matmul_precision("highest"):
    loss, terms = jax.jit(lambda p: losses.local_terms(
        model, p, batch, t, noise, jax.random.key(0), schedule.make_schedule(),
        cls_weight=1e-3, train=False))(student)
  for ours, ref in (("simple", "local_loss_simple"), ("ce", "local_loss_ce"),
                    ("vlb", "local_loss_vlb"), ("total", "local_loss_total")):
    np.testing.assert_allclose(terms[ours], z[ref], rtol=0, atol=1e-6, err_msg=ours)


def test_kd_loss_golden(golden):
  z, model, student, teachers, batch, t, noise = golden
  num_classes = model.config.num_classes
  mask = lambda c: jnp.zeros((num_classes,), bool).at[jnp.asarray(c, jnp.int32)].set(True)
  with jax.default_matmul_precision("highest"):
    loss, terms = jax.jit(lambda p, o, n: losses.kd_terms(
        model, p, o, n, batch, t, noise, jax.random.key(0), schedule.make_schedule(),
        new_class_mask_K=mask(z["new_classes"]), old_class_mask_K=mask(z["old_classes"]),
        cls_active=True, weights=WEIGHTS, teacher_train=False, train=False))(
            student, teachers["old"], teachers["new"])
  pairs = dict(simple="kd_loss_simple", simple_weighted="kd_term_simple_weighted",
               ce="kd_loss_ce", ce_weighted="kd_term_ce_weighted",
               eps_mse_old="kd_eps_mse_old", eps_mse_new="kd_eps_mse_new",
               diffusion_kd="kd_loss_diffusion_kd", softce_old="kd_cls_softce_old",
               softce_new="kd_cls_softce_new", classifier_kd="kd_loss_classifier_kd",
               pi_old="kd_pi_old", pi_new="kd_pi_new", vlb="kd_loss_vlb", total="kd_loss_total")
  for ours, ref in pairs.items():
    np.testing.assert_allclose(terms[ours], z[ref], rtol=0, atol=1e-6, err_msg=ours)
  assert float(terms["n_old"]) == z["kd_old_mask"].sum()
  assert float(terms["n_new"]) == z["kd_new_mask"].sum()
  assert loss == terms["total"]
