"""Accuracy-matrix metrics: average accuracy and forgetting."""
import numpy as np
import pytest

from jdcl_jax.cl import metrics


def _matrix():
  acc = metrics.empty_matrix(3)
  acc[0][0] = 1.0
  acc[1][:2] = [0.8, 0.9]
  acc[2][:3] = [0.6, 0.7, 1.0]
  return acc


def test_average_accuracy_uses_last_completed_row():
  acc = _matrix()
  assert metrics.average_accuracy(acc) == pytest.approx((0.6 + 0.7 + 1.0) / 3)
  assert metrics.average_accuracy(acc, 1) == pytest.approx(0.85)


def test_forgetting_is_drop_from_best_earlier_accuracy():
  acc = _matrix()
  # task 1: best 1.0 -> 0.6 (0.4); task 2: best 0.9 -> 0.7 (0.2)
  assert metrics.average_forgetting(acc) == pytest.approx(0.3)
  assert metrics.average_forgetting(acc, 0) == 0.0


def test_partial_matrix_and_empty_matrix():
  acc = metrics.empty_matrix(3)
  with pytest.raises(ValueError, match="no completed task"):
    metrics.average_accuracy(acc)
  acc[0][0] = 0.5
  assert metrics.last_row(acc) == 0


def test_per_task_accuracy():
  labels = np.array([0, 1, 2, 3, 2, 3])
  pred = np.array([0, 0, 2, 3, 3, 3])
  assert metrics.per_task_accuracy(pred, labels, [[0, 1], [2, 3]], 1) == [0.5, 0.75]


def test_format_table_lists_completed_rows():
  text = metrics.format_table(_matrix(), "title")
  assert "title" in text and text.count("\n") == 5
