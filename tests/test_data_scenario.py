"""Class-incremental splits, label subsets and deterministic batching."""
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jdcl_jax.data import batching
from jdcl_jax.data import scenario

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- splits ---------------------------------------------------------------------------------------

def test_task_classes_native_order():
  assert scenario.task_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  tasks = scenario.task_classes(100, 10)
  assert tasks[3] == list(range(30, 40))


@pytest.mark.parametrize("num_classes, num_tasks", [(10, 5), (100, 5), (100, 10)])
def test_every_class_in_exactly_one_task(num_classes, num_tasks):
  for seed in (None, 3):
    tasks = scenario.task_classes(num_classes, num_tasks, class_order_seed=seed)
    flat = [c for t in tasks for c in t]
    assert sorted(flat) == list(range(num_classes))
    assert all(len(t) == num_classes // num_tasks for t in tasks)


def test_class_order_seed_is_a_reproducible_permutation():
  a = scenario.task_classes(10, 5, class_order_seed=1)
  assert a == scenario.task_classes(10, 5, class_order_seed=1)
  assert a != scenario.task_classes(10, 5) and a != scenario.task_classes(10, 5, class_order_seed=2)


def test_task_classes_validates_divisibility():
  with pytest.raises(ValueError, match="not divisible"):
    scenario.task_classes(10, 3)


def test_task_and_seen_indices():
  labels = np.array([3, 0, 1, 2, 1, 0, 3, 2])
  tasks = scenario.task_classes(4, 2)
  np.testing.assert_array_equal(scenario.task_indices(labels, tasks[1]), [0, 3, 6, 7])
  assert scenario.seen_classes(tasks, 0) == [0, 1]
  assert scenario.seen_classes(tasks, 1) == [0, 1, 2, 3]
  np.testing.assert_array_equal(scenario.seen_indices(labels, tasks, 0), [1, 2, 4, 5])
  assert len(scenario.seen_indices(labels, tasks, 1)) == len(labels)
  np.testing.assert_array_equal(scenario.class_mask([1, 3], 4), [False, True, False, True])
  with pytest.raises(ValueError):
    scenario.seen_classes(tasks, 2)


# ---- semi-supervised subsets --------------------------------------------------------------------

def _labels(num_classes=10, per_class=50):
  return np.random.RandomState(0).permutation(np.repeat(np.arange(num_classes), per_class))


def test_labelled_subset_balanced_reproducible_and_seeded():
  labels = _labels()
  idx = scenario.labelled_subset(labels, 40)
  assert len(idx) == 40 == len(np.unique(idx))
  assert np.bincount(labels[idx], minlength=10).tolist() == [4] * 10
  np.testing.assert_array_equal(idx, scenario.labelled_subset(labels, 40, seed=42))
  assert not np.array_equal(idx, scenario.labelled_subset(labels, 40, seed=0))
  # Shuffled after the per-class draws, not grouped by class.
  assert not np.all(np.diff(labels[idx]) >= 0)
  # num_labelled // K per class: the remainder is dropped (as the reference).
  assert len(scenario.labelled_subset(labels, 47)) == 40


def test_labelled_subset_errors():
  with pytest.raises(ValueError, match="no example per class"):
    scenario.labelled_subset(_labels(), 5)
  with pytest.raises(ValueError, match="examples <"):
    scenario.labelled_subset(_labels(per_class=3), 40)


def test_semi_supervised_task_streams():
  labels = _labels()
  labelled = scenario.labelled_subset(labels, 100)
  lab, unlab = scenario.semi_supervised_task(labels, [2, 3], labelled)
  assert len(lab) == 20 and set(labels[lab]) == {2, 3}
  assert set(lab) <= set(unlab)  # the unlabelled stream includes the labelled images
  np.testing.assert_array_equal(unlab, scenario.task_indices(labels, [2, 3]))
  assert scenario.ssl_batch_sizes(32) == (32, 224)
  assert scenario.ssl_batch_sizes(16, mu=7) == (16, 112)


# ---- batching -----------------------------------------------------------------------------------

def test_batches_are_concatenated_permutations_with_drop_last():
  n, b = 10, 4
  stream = np.concatenate([batching.batch_indices(0, 1, "local", s, n, b) for s in range(5)])
  assert len(stream) == 20
  for epoch in range(2):  # batch 2 straddles the epoch boundary, as RandomSampler's stream
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:])


def test_batches_are_stateless_and_keyed():
  args = (7, 2, "global", 123, 50, 16)
  first = batching.batch_indices(*args)
  batching._permutation.cache_clear()  # pylint: disable=protected-access  (a "fresh process")
  np.testing.assert_array_equal(first, batching.batch_indices(*args))
  for other in [(8, 2, "global"), (7, 3, "global"), (7, 2, "local")]:
    assert not np.array_equal(first, batching.batch_indices(*other, 123, 50, 16))
  assert first.dtype == np.int64 and first.min() >= 0 and first.max() < 50


def test_batch_larger_than_dataset():
  idx = batching.batch_indices(0, 0, 0, 1, 3, 8)
  assert len(idx) == 8 and set(idx) == {0, 1, 2}


def test_ssl_batch_indices():
  lab, unlab = batching.ssl_batch_indices(0, 1, 5, num_labelled=20, num_unlabelled=1000,
                                          labelled_batch=4, mu=7)
  assert lab.shape == (4,) and unlab.shape == (28,) and lab.max() < 20


def test_to_global_batch_single_process():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sh = NamedSharding(mesh, P("data"))
  batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8, dtype=np.int32)}
  out = batching.to_global_batch(batch, sh)
  assert out["x"].sharding == sh and out["y"].dtype == np.int32
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])


_MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jdcl_jax.data import batching
    assert jax.device_count() == 4
    sh = NamedSharding(jax.make_mesh((4,), ("data",)), P("data"))
    x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    out = batching.to_global_batch(x, sh)
    assert [s.data.shape for s in out.addressable_shards] == [(2, 2)] * 4
    np.testing.assert_array_equal(np.asarray(out), x)
    print("OK")
""")


def test_to_global_batch_on_four_cpu_devices():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], capture_output=True,
                        text=True, timeout=120, env=env, cwd=REPO)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
