"""Class-incremental scenarios and semi-supervised label subsets (spec 5.1, 5.4).

Everything here is host-side numpy over label arrays and returns example
indices, so the images stay in one `ArrayDataset` and a task is just a view.
Evaluation is class-incremental: after task t the test set is every test image
of the classes seen so far (`seen_indices`), scored with one head over all K.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def task_classes(num_classes: int, num_tasks: int,
                 class_order_seed: Optional[int] = None) -> list[list[int]]:
  """Splits classes into `num_tasks` equal, disjoint blocks.

  The default keeps the native label order ([[0, 1], [2, 3], ...] on CIFAR-10),
  as the reference does; a seed permutes the class order first.
  """
  if num_tasks < 1 or num_classes < 1:
    raise ValueError(f"need num_classes, num_tasks >= 1, got {num_classes}, {num_tasks}")
  if num_classes % num_tasks:
    raise ValueError(f"num_classes={num_classes} is not divisible by "
                     f"num_tasks={num_tasks}")
  order = np.arange(num_classes)
  if class_order_seed is not None:
    order = np.random.RandomState(class_order_seed).permutation(num_classes)
  per_task = num_classes // num_tasks
  return [order[k * per_task:(k + 1) * per_task].tolist() for k in range(num_tasks)]


def task_indices(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Ascending indices of the examples whose label is in `classes`."""
  return np.flatnonzero(np.isin(labels, np.asarray(classes))).astype(np.int64)


def seen_classes(tasks: Sequence[Sequence[int]], t: int) -> list[int]:
  """Classes of tasks 0..t (t is 0-based), in task order."""
  if not 0 <= t < len(tasks):
    raise ValueError(f"task {t} out of range for {len(tasks)} tasks")
  return [c for task in tasks[:t + 1] for c in task]


def seen_indices(labels: np.ndarray, tasks: Sequence[Sequence[int]], t: int) -> np.ndarray:
  """Test selection after task t: every example of a class seen so far."""
  return task_indices(labels, seen_classes(tasks, t))


def class_mask(classes: Sequence[int], num_classes: int) -> np.ndarray:
  """Boolean mask of length K, the form the traced losses take (DESIGN.md)."""
  mask = np.zeros(num_classes, bool)
  mask[np.asarray(classes, int)] = True
  return mask


def labelled_subset(labels: np.ndarray, num_labelled: int, seed: int = 42) -> np.ndarray:
  """Class-balanced labelled indices over the whole training set (spec 5.4).

  num_labelled // K indices per class, drawn class by class (in label order)
  without replacement from one RandomState(seed), then shuffled. The seed is
  the config's fixed 42, independent of the run seed, as in the reference.
  """
  classes = np.unique(labels)
  per_class = num_labelled // len(classes)
  if per_class < 1:
    raise ValueError(f"num_labelled={num_labelled} gives no example per class "
                     f"for {len(classes)} classes")
  rs = np.random.RandomState(seed)
  picked = []
  for c in classes:
    pool = np.flatnonzero(labels == c)
    if len(pool) < per_class:
      raise ValueError(f"class {c} has {len(pool)} examples < {per_class} requested")
    picked.append(rs.choice(pool, per_class, replace=False))
  idx = np.concatenate(picked)
  rs.shuffle(idx)
  return idx.astype(np.int64)


def semi_supervised_task(labels: np.ndarray, classes: Sequence[int],
                         labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(labelled, unlabelled) indices of one task.

  The labelled part is the global labelled subset restricted to the task's
  classes (its shuffled order kept); the unlabelled stream is *every* training
  image of the task's classes, the labelled ones included (spec 5.4).
  """
  in_task = np.isin(labels[labelled], np.asarray(classes))
  return labelled[in_task], task_indices(labels, classes)


def ssl_batch_sizes(labelled_batch: int, mu: int = 7) -> tuple[int, int]:
  """(B_l, B_u = mu * B_l): FixMatch's labelled/unlabelled ratio (spec 6)."""
  if labelled_batch < 1 or mu < 1:
    raise ValueError(f"need labelled_batch, mu >= 1, got {labelled_batch}, {mu}")
  return labelled_batch, mu * labelled_batch
