"""Continual task streams: a sequence of federated tasks built over any arrays source.

Two standard constructions (van de Ven & Tolias 2019, "Three scenarios for continual
learning"):

* ``permuted``: task t applies one fixed random permutation of the input features
  (pixels) to every example, train and test alike; labels are unchanged, so all tasks
  share one output head (domain-incremental). Permuted MNIST is the classic instance.
* ``split``: the classes are divided into disjoint groups, one group per task.
  ``scenario='task'`` (task-incremental) gives the task id at training and test time,
  so a model predicts only among the task's classes (a multi-head model, obtained by
  masking the logits of one shared head with ``Task.class_mask``).
  ``scenario='class'`` (class-incremental) gives no task id at test time: the model
  chooses among all classes.

Each task's training examples are partitioned over the same number of clients with
``fedjax_lab.data.partitioners`` (a fresh draw per task) and packed as a
``FederatedData``; its test examples stay centralized. Every example carries its task
id in an int32 array ``'task'`` so a loss can mask logits per example.
"""
import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from fedjax_lab.data import partitioners
from fedjax_lab.data.federated import FederatedData, train_test_split

SCENARIOS = ("permuted", "task", "class")
PARTITIONS = ("iid", "dirichlet")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One task of a stream.

  Attributes:
    index: position in the stream (0-based).
    train: the task's training examples, partitioned over clients; arrays ``'x'``,
      ``'y'`` (int32, global labels) and ``'task'`` (int32, == index).
    test: centralized test arrays with the same names.
    classes: int ``[k]`` sorted labels present in the task.
    class_mask: bool ``[num_classes]``; the logits a task-aware model may use (all
      True unless the stream is task-incremental).
  """
  index: int
  train: FederatedData
  test: dict
  classes: np.ndarray
  class_mask: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class TaskStream:
  """A sequence of tasks over one label space.

  Attributes:
    tasks: the tasks in training order.
    scenario: one of ``SCENARIOS``.
    num_classes: size of the (shared) label space.
  """
  tasks: tuple
  scenario: str
  num_classes: int

  def __len__(self):
    return len(self.tasks)

  def __iter__(self):
    return iter(self.tasks)

  def __getitem__(self, i):
    return self.tasks[i]

  @property
  def class_masks(self) -> np.ndarray:
    """bool ``[num_tasks, num_classes]``: row t is ``tasks[t].class_mask``."""
    return np.stack([t.class_mask for t in self.tasks])

  @property
  def num_clients(self) -> int:
    return self.tasks[0].train.num_clients


def _partition(labels, partition, num_clients, alpha, seed, min_partition_size):
  if partition not in PARTITIONS:
    raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
  if partition == "iid":
    return partitioners.iid(labels, num_clients, seed)
  return partitioners.dirichlet(labels, num_clients, alpha, seed,
                                min_partition_size=min_partition_size)


def _check_source(arrays: Mapping[str, np.ndarray], name: str) -> dict:
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if "x" not in arrays or "y" not in arrays:
    raise ValueError(f"{name} must hold arrays 'x' and 'y', got {sorted(arrays)}")
  if arrays["x"].shape[0] != arrays["y"].shape[0]:
    raise ValueError(f"{name}: 'x' has {arrays['x'].shape[0]} examples, 'y' has "
                     f"{arrays['y'].shape[0]}")
  if not np.issubdtype(arrays["y"].dtype, np.integer):
    raise ValueError(f"{name}['y'] must hold integer labels, got dtype {arrays['y'].dtype}")
  return arrays


def _seeds(seed: int, num_tasks: int) -> np.ndarray:
  """Independent (permutation, partition) seeds per task."""
  return np.random.SeedSequence(seed).generate_state(2 * num_tasks).reshape(num_tasks, 2)


def permute_features(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Applies one permutation to the flattened features of every example.

  Args:
    x: ``[n, ...]``; the trailing axes are flattened to ``F`` features.
    permutation: int ``[F]``, a permutation of ``range(F)``.

  Returns:
    ``[n, ...]`` with ``out.reshape(n, F)[:, i] == x.reshape(n, F)[:, permutation[i]]``.
  """
  n = x.shape[0]
  flat = x.reshape(n, -1)
  if sorted(np.asarray(permutation).tolist()) != list(range(flat.shape[1])):
    raise ValueError(f"permutation must be a permutation of range({flat.shape[1]})")
  return flat[:, permutation].reshape(x.shape)


def permuted(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], num_tasks: int,
             num_clients: int, partition: str = "iid", alpha: float = 0.5, seed: int = 0,
             identity_first: bool = True, min_partition_size: int = 2) -> TaskStream:
  """Permuted tasks: task t applies a fixed random feature permutation to all examples.

  Args:
    train, test: arrays ``{'x': [n, ...], 'y': int [n]}`` (any other names are kept).
    num_tasks: number of tasks (>= 1).
    num_clients: clients per task.
    partition: ``'iid'`` or ``'dirichlet'`` (label skew, concentration ``alpha``).
    alpha: Dirichlet concentration.
    seed: seeds the permutations and the partitions.
    identity_first: task 0 sees the unpermuted inputs (the usual convention).
    min_partition_size: smallest client for ``'dirichlet'``.

  Returns:
    A ``TaskStream`` with ``scenario='permuted'``; all class masks are all True.
  """
  train, test = _check_source(train, "train"), _check_source(test, "test")
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  num_features = int(np.prod(train["x"].shape[1:]))
  if int(np.prod(test["x"].shape[1:])) != num_features:
    raise ValueError(f"train and test examples differ in shape: {train['x'].shape[1:]} vs "
                     f"{test['x'].shape[1:]}")
  num_classes = int(max(train["y"].max(), test["y"].max())) + 1
  classes = np.unique(np.concatenate([train["y"], test["y"]]))
  mask = np.ones(num_classes, bool)
  tasks = []
  for t, (perm_seed, part_seed) in enumerate(_seeds(seed, num_tasks)):
    if t == 0 and identity_first:
      perm = np.arange(num_features)
    else:
      perm = np.random.default_rng(perm_seed).permutation(num_features)
    task_train = {**train, "x": permute_features(train["x"], perm),
                  "task": np.full(train["y"].shape, t, np.int32)}
    task_test = {**test, "x": permute_features(test["x"], perm),
                 "task": np.full(test["y"].shape, t, np.int32)}
    ids = _partition(train["y"], partition, num_clients, alpha, int(part_seed), min_partition_size)
    tasks.append(Task(t, FederatedData.from_client_ids(task_train, ids, num_clients), task_test,
                      classes, mask.copy()))
  return TaskStream(tuple(tasks), "permuted", num_classes)


def class_groups(labels: np.ndarray, num_tasks: Optional[int] = None,
                 classes_per_task: Optional[int] = None) -> list[np.ndarray]:
  """Consecutive groups of the sorted classes: ``num_tasks`` equal groups, or groups of
  ``classes_per_task`` (exactly one of the two)."""
  classes = np.unique(labels)
  if (num_tasks is None) == (classes_per_task is None):
    raise ValueError("give exactly one of num_tasks and classes_per_task")
  if classes_per_task is not None:
    if classes_per_task < 1 or len(classes) % classes_per_task:
      raise ValueError(f"classes_per_task={classes_per_task} must divide the "
                       f"{len(classes)} classes")
    num_tasks = len(classes) // classes_per_task
  if num_tasks < 1 or len(classes) % num_tasks:
    raise ValueError(f"num_tasks={num_tasks} must divide the {len(classes)} classes")
  return [g for g in np.split(classes, num_tasks)]


def split(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], num_clients: int,
          num_tasks: Optional[int] = None, classes_per_task: Optional[int] = None,
          groups: Optional[Sequence[Sequence[int]]] = None, scenario: str = "task",
          partition: str = "iid", alpha: float = 0.5, seed: int = 0,
          min_partition_size: int = 2) -> TaskStream:
  """Split-by-class tasks: task t holds the examples of one group of classes.

  Args:
    train, test: arrays ``{'x': [n, ...], 'y': int [n]}``.
    num_clients: clients per task.
    num_tasks / classes_per_task / groups: how to group the classes (give one);
      ``groups`` lists the classes of each task explicitly (disjoint).
    scenario: ``'task'`` (task id known, logits masked to the task's classes) or
      ``'class'`` (no task id at test time).
    partition, alpha, seed, min_partition_size: as in ``permuted``.

  Returns:
    A ``TaskStream``; labels keep their global values.
  """
  train, test = _check_source(train, "train"), _check_source(test, "test")
  if scenario not in ("task", "class"):
    raise ValueError(f"split streams need scenario 'task' or 'class', got {scenario!r}")
  if groups is None:
    groups = class_groups(train["y"], num_tasks, classes_per_task)
  else:
    if num_tasks is not None or classes_per_task is not None:
      raise ValueError("give groups alone, without num_tasks or classes_per_task")
    groups = [np.unique(np.asarray(g, np.int64)) for g in groups]
    flat = np.concatenate(groups)
    if len(np.unique(flat)) != len(flat):
      raise ValueError(f"class groups overlap: {[g.tolist() for g in groups]}")
  num_classes = int(max(train["y"].max(), test["y"].max(), max(g.max() for g in groups))) + 1
  tasks = []
  for t, (group, (_, part_seed)) in enumerate(zip(groups, _seeds(seed, len(groups)))):
    rows_train = np.isin(train["y"], group)
    rows_test = np.isin(test["y"], group)
    if not rows_train.any() or not rows_test.any():
      raise ValueError(f"task {t} (classes {group.tolist()}) has no train or no test examples")
    task_train = {k: v[rows_train] for k, v in train.items()}
    task_test = {k: v[rows_test] for k, v in test.items()}
    task_train["task"] = np.full(task_train["y"].shape, t, np.int32)
    task_test["task"] = np.full(task_test["y"].shape, t, np.int32)
    ids = _partition(task_train["y"], partition, num_clients, alpha, int(part_seed),
                     min_partition_size)
    mask = np.zeros(num_classes, bool)
    if scenario == "task":
      mask[group] = True
    else:
      mask[:] = True
    tasks.append(Task(t, FederatedData.from_client_ids(task_train, ids, num_clients), task_test,
                      group, mask))
  return TaskStream(tuple(tasks), scenario, num_classes)


def make_stream(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], kind: str,
                num_tasks: int, num_clients: int, partition: str = "iid", alpha: float = 0.5,
                seed: int = 0, min_partition_size: int = 2) -> TaskStream:
  """``kind`` in ``SCENARIOS``: ``'permuted'``, or ``'task'``/``'class'`` split streams
  with ``num_tasks`` equal class groups."""
  if kind not in SCENARIOS:
    raise ValueError(f"unknown stream kind {kind!r}; choose one of {', '.join(SCENARIOS)}")
  if kind == "permuted":
    return permuted(train, test, num_tasks, num_clients, partition, alpha, seed,
                    min_partition_size=min_partition_size)
  return split(train, test, num_clients, num_tasks=num_tasks, scenario=kind,
               partition=partition, alpha=alpha, seed=seed,
               min_partition_size=min_partition_size)


def digits_stream(kind: str = "permuted", num_tasks: int = 10, num_clients: int = 20,
                  partition: str = "iid", alpha: float = 0.5, seed: int = 0,
                  test_fraction: float = 0.2, min_partition_size: int = 2) -> TaskStream:
  """A stream over scikit-learn's digits (embedded, no download): split train/test with
  ``test_fraction`` first, then build the tasks."""
  from fedjax_lab.data.sources import digits
  split_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
  train, test = train_test_split(digits(), test_fraction, split_seed)
  return make_stream(train, test, kind, num_tasks, num_clients, partition, alpha, seed,
                     min_partition_size)
