"""The pretraining corpus: unlabelled sentences, and their packing into sequences."""

import os
import random
from typing import List, Optional, Sequence

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.data import clue
from tfadv.data.base import TextDataset
from tfadv.errors import MissingInputError


@gin.configurable
class PretrainingCorpus(TextDataset):
  """Sentences for pretraining: unlabeled files plus the train splits' texts.

  Evaluation split: `num_eval` sentences held out of `eval_files` (a seeded
  draw; by default all unlabeled files; `configs/pretrain_mlm_zh.gin` keeps
  it to TNEWS and EPRSTMT, so that presets pretrained on more files are
  scored on the same held-out sentences). Dev
  and test files are refused, so no evaluation text of a fine-tuning task is
  ever seen in pretraining.

  Args:
    data_dir: root the file names are relative to, e.g.
      `../shared/data/fewclue` (see WORKSPACE.md).
    unlabeled_files: CLUE JSON-lines files whose records have a `sentence`.
    train_files: labelled training splits whose sentences are added.
    num_eval: unlabeled sentences held out for masked-token accuracy.
    eval_files: the unlabeled files the held-out sentences are drawn from
      (each must also be in `unlabeled_files`; default: all of them); the
      rest of them train.
    seed: the hold-out draw.

  Example:
  >>> corpus = PretrainingCorpus("../shared/data/fewclue")
  >>> texts, _ = corpus.examples("train")  # unlabelled: labels are None
  >>> len(texts), len(corpus.examples("eval")[0])
  (41774, 2000)
  """

  name = "pretraining_corpus"
  eval_split = "heldout"

  def __init__(self, data_dir: str = gin.REQUIRED,
               unlabeled_files: Sequence[str] = ("tnews/unlabeled.json",
                                                 "eprstmt/unlabeled.json"),
               train_files: Sequence[str] = ("tnews/train.json", "iflytek/train.json"),
               num_eval: int = 2000,
               eval_files: Optional[Sequence[str]] = None,
               seed: int = 0):
    checks.check("PretrainingCorpus", num_eval=(num_eval, checks.AT_LEAST_ONE))
    eval_files = unlabeled_files if eval_files is None else eval_files
    missing = [f for f in eval_files if f not in unlabeled_files]
    if missing:
      raise ValueError(
          f"PretrainingCorpus: eval_files {missing} are not among unlabeled_files "
          f"{list(unlabeled_files)}; add them there or drop them from eval_files.")
    for name in list(unlabeled_files) + list(train_files):
      base = os.path.basename(name).lower()
      if base.startswith(("dev", "test")):
        raise ValueError(
            f"PretrainingCorpus: {name!r} looks like an evaluation split; "
            "pretraining reads unlabeled and train files only.")
    self.data_dir = data_dir
    self.unlabeled_files = tuple(unlabeled_files)
    self.train_files = tuple(train_files)
    self.num_eval = num_eval
    self.eval_files = tuple(eval_files)
    self.seed = seed
    self._splits = None

  def _read(self, name: str, require_label: bool) -> List[str]:
    path = name if ("://" in name or os.path.isabs(name)) else os.path.join(
        self.data_dir, name)
    if not tf.io.gfile.exists(path):
      raise MissingInputError(
          f"Pretraining text not found: {path}. Set PretrainingCorpus.data_dir "
          "(WORKSPACE.md shows the FewCLUE layout).")
    # Raw line separators inside sentences are real data: keep the records.
    return clue.read_clue_file(path, malformed="repair",
                               require_label=require_label).texts

  def label_names(self) -> List[str]:
    return []

  def examples(self, split: str):
    """(the "train" or "eval" sentences, None)."""
    self.check_split(split)
    if self._splits is None:
      pool = [t for f in self.eval_files for t in self._read(f, False)]
      random.Random(self.seed).shuffle(pool)
      held_out = pool[:self.num_eval]
      train = pool[self.num_eval:]
      for f in self.unlabeled_files:
        if f not in self.eval_files:
          train += self._read(f, False)
      for f in self.train_files:
        train += self._read(f, True)
      self._splits = {"train": [t for t in train if t.strip()],
                      "eval": [t for t in held_out if t.strip()]}
    return self._splits[split], None


def pack(texts: List[str], characters: int) -> List[str]:
  """Joins consecutive texts (by a space) into sequences of ≥ `characters`.

  Example:
  >>> pack(["今天", "天气", "很好"], characters=4)
  ['今天 天气', '很好']
  """
  if characters <= 0:
    return list(texts)
  packed, current = [], ""
  for text in texts:
    current = f"{current} {text}" if current else text
    if len(current) >= characters:
      packed.append(current)
      current = ""
  if current:
    packed.append(current)
  return packed
