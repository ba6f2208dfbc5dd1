"""Continual-learning metrics as pure functions over an accuracy matrix.

acc[t][k] is the accuracy on task k's test images after training task t (both 0-based);
entries with k > t are None (task not seen yet).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

AccMatrix = list[list[Optional[float]]]


def empty_matrix(num_tasks: int) -> AccMatrix:
  return [[None] * num_tasks for _ in range(num_tasks)]


def average_accuracy(acc: AccMatrix, t: Optional[int] = None) -> float:
  """A_t: mean over the seen tasks k <= t of acc[t][k] (default t = last row filled)."""
  t = last_row(acc) if t is None else t
  return float(np.mean([acc[t][k] for k in range(t + 1)]))


def average_forgetting(acc: AccMatrix, t: Optional[int] = None) -> float:
  """F_t: mean over k < t of (max_{k <= s < t} acc[s][k]) - acc[t][k]. 0.0 when t = 0."""
  t = last_row(acc) if t is None else t
  if t == 0:
    return 0.0
  drops = [max(acc[s][k] for s in range(k, t)) - acc[t][k] for k in range(t)]
  return float(np.mean(drops))


def last_row(acc: AccMatrix) -> int:
  filled = [t for t, row in enumerate(acc) if row[t] is not None]
  if not filled:
    raise ValueError("accuracy matrix has no completed task")
  return filled[-1]


def per_task_accuracy(pred: np.ndarray, labels: np.ndarray,
                      tasks: Sequence[Sequence[int]], upto: int) -> list[float]:
  """Accuracy of predictions on each seen task's test images (tasks 0..upto)."""
  out = []
  for k in range(upto + 1):
    sel = np.isin(labels, np.asarray(tasks[k]))
    out.append(float(np.mean(pred[sel] == labels[sel])) if sel.any() else float("nan"))
  return out


def format_table(acc: AccMatrix, title: str) -> str:
  """A readable accuracy matrix in percent, rows = after task t."""
  n = len(acc)
  head = "after task | " + " | ".join(f"T{k + 1:<4d}" for k in range(n)) + " | A_t"
  lines = [title, head, "-" * len(head)]
  for t, row in enumerate(acc):
    if row[t] is None:
      continue
    cells = " | ".join(f"{100 * v:5.1f}" if v is not None else "  -  " for v in row)
    lines.append(f"{t + 1:>10d} | {cells} | {100 * average_accuracy(acc, t):5.1f}")
  return "\n".join(lines)
