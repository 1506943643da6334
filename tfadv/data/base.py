"""The dataset contracts: labelled text, labelled arrays, and the validation split carved from train.

Every dataset a task reads offers the same small interface:

- `name`: a short name (labels.json records it);
- `label_names()`: raw label ids in class-index order (`[]` for unlabelled
  text such as a pretraining corpus);
- `splits`: the split names it serves, from "train", "validation" (a part of
  train carved off for model selection, when the dataset has one) and
  "eval" (the reported split);
- `eval_split`: what "eval" is called in records: "dev" for CLUE's dev.json,
  "test" for image test sets;

and its examples by split, as one of two shapes:

- `TextDataset.examples(split) -> (texts, labels)` (CLUE, the product
  reviews, the pretraining corpus with labels `None`);
- `ArrayDataset.arrays(split) -> {name: array}` (images).

A new dataset subclasses one of them; `tfadv.tasks` turns either into
model inputs.

Example:
>>> class Tiny(TextDataset):
...   name = "tiny"
...   def label_names(self): return ["neg", "pos"]
...   def examples(self, split): return ["好", "坏"], ["pos", "neg"]
>>> Tiny().splits
('train', 'eval')
"""

import abc
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SPLITS = ("train", "validation", "eval")


class Dataset(abc.ABC):
  """What every dataset offers (see the module docstring)."""

  name: str = "dataset"
  eval_split: str = "eval"

  @abc.abstractmethod
  def label_names(self) -> List[str]:
    """Raw label ids in class-index order."""

  @property
  def splits(self) -> Tuple[str, ...]:
    return ("train", "eval")

  def where(self, split: str, label: str) -> str:
    """Where a record of `split` labelled `label` is, for error messages
    (`file:line` where the dataset knows it)."""
    return f"the {split} split of {self.name}"

  def check_split(self, split: str) -> None:
    if split not in self.splits:
      raise ValueError(f"{type(self).__name__}: no split {split!r}; it has "
                       f"{list(self.splits)}" + (
                           " (a validation split needs validation_fraction > 0)"
                           if split == "validation" else "") + ".")


class TextDataset(Dataset):
  """Labelled (or unlabelled) text by split."""

  @abc.abstractmethod
  def examples(self, split: str) -> Tuple[List[str], Optional[List[str]]]:
    """(texts, raw labels) of `split`; labels `None` for unlabelled text."""


class ArrayDataset(Dataset):
  """Examples as arrays by split (e.g. {"image": uint8 [N, H, W, C], "label": int32 [N]})."""

  @abc.abstractmethod
  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    """The arrays of `split`."""


def carve_validation(labels: Sequence, fraction: float,
                     seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices): a seeded split stratified by label.

  Each label with n ≥ 2 examples gives round(n·fraction) of them (at least 1,
  never all) to validation; a label seen once stays in train. The draw
  depends on the labels, the fraction and the seed only.

  Example:
  >>> train, validation = carve_validation(["a"] * 8 + ["b"] * 4, 0.25)
  >>> len(train), len(validation)
  (9, 3)
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation_fraction={fraction}; expected 0 < fraction < 1.")
  labels = np.asarray(labels)
  rng = np.random.RandomState(seed)
  validation = []
  for label in sorted(set(labels.tolist()), key=str):
    members = np.nonzero(labels == label)[0]
    if len(members) < 2:
      continue
    take = min(max(1, int(round(len(members) * fraction))), len(members) - 1)
    validation.extend(rng.permutation(members)[:take].tolist())
  validation = np.sort(np.asarray(validation, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), validation)
  return train, validation


def carve_fold(labels: Sequence, num_folds: int, fold: int,
               seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices): fold `fold` of a seeded K-fold
  partition stratified by label (k-fold cross-validation over train).

  Each label's examples are shuffled (by `seed`) and dealt to the folds in
  turn, so the folds are disjoint, cover every example, and each holds about
  1/K of every label. The partition depends on the labels, K and the seed only.

  Example:
  >>> folds = [carve_fold(["a"] * 6 + ["b"] * 4, 2, j)[1] for j in (0, 1)]
  >>> sorted(np.concatenate(folds).tolist()) == list(range(10))
  True
  """
  if num_folds < 2 or not 0 <= fold < num_folds:
    raise ValueError(f"fold {fold} of num_folds={num_folds}; expected 0 <= fold < "
                     "num_folds and num_folds >= 2.")
  labels = np.asarray(labels)
  rng = np.random.RandomState(seed)
  validation = []
  offset = 0  # deal each label on from where the last one stopped: even fold sizes
  for label in sorted(set(labels.tolist()), key=str):
    members = rng.permutation(np.nonzero(labels == label)[0])
    dealt = (np.arange(len(members)) + offset) % num_folds
    validation.extend(members[dealt == fold].tolist())
    offset = (offset + len(members)) % num_folds
  validation = np.sort(np.asarray(validation, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), validation)
  return train, validation
