"""CLUE classification tasks (IFLYTEK, TNEWS, ...): one preset of `TextFileDataset`.

A CLUE file holds one JSON object per line, with a `sentence`, a `label` id
and a label description (`label_des` in CLUE's full releases, `label_desc` in
TNEWS as FewCLUE ships it); a task directory holds `train.json`, `dev.json`
and, for some tasks, `labels.json`. Malformed records (FewCLUE IFLYTEK's raw
line separators, JSON split over lines, ...) follow the policies of
`tfadv.data.text_files`.
"""

import os
from typing import Optional

import gin

from tfadv.data.text_files import (  # pylint: disable=unused-import
    MALFORMED_POLICIES, Fields, MalformedRecordError, TextFileDataset, TextSplit,
    _sort_labels, read_label_file, read_text_file)

ClueSplit = TextSplit
CLUE_FIELDS = Fields(text="sentence", label="label", owner="ClueDataset")


def read_clue_file(path: str, malformed: str = "error", require_label: bool = True) -> TextSplit:
  """Reads one CLUE JSON-lines file (`read_text_file` with CLUE's fields).

  Example:
  >>> split = read_clue_file("../shared/data/fewclue/tnews/dev.json")
  >>> len(split.texts), split.labels[0]
  (1098, '115')
  """
  return read_text_file(path, CLUE_FIELDS, malformed, require_label, format_="jsonl")


@gin.configurable
class ClueDataset(TextFileDataset):
  """A CLUE classification task stored as `train.json` / `dev.json`.

  Label ids (e.g. TNEWS's 100..116 with gaps) are mapped to 0..C-1 in
  increasing order. The label set comes from `labels.json` when the task
  directory has one, else from the train file.

  Args:
    data_dir: directory holding the task's files, e.g.
      `../shared/data/fewclue/tnews` (see WORKSPACE.md).
    train_file: file name (in `data_dir`) or path of the training split.
    eval_file: file name or path of the evaluation split; any CLUE-format
      file works, e.g. `eval_file="/data/test.json"`.
    labels_file: optional label list; `None` derives labels from train.
    malformed: policy for malformed records: "error", "skip" or "repair".
    validation_fraction: the share of train carved off as the "validation"
      split (stratified by label, seeded; `tfadv.data.base.carve_validation`),
      on which the experiment selects its checkpoint; "train" is the rest.
      0: no validation split.
    validation_seed: the carving's seed (fixed: every run of a table
      validates on the same examples).
    num_folds, validation_fold: k-fold cross-validation instead of the
      fraction (`TextFileDataset`).
    num_eval: the first N dev records only (`TextFileDataset`).

  Example:
  >>> ds = ClueDataset("../shared/data/fewclue/tnews")
  >>> len(ds.label_names())
  15
  """

  owner = "ClueDataset"

  def __init__(self, data_dir: str = gin.REQUIRED, train_file: str = "train.json",
               eval_file: str = "dev.json", labels_file: Optional[str] = "labels.json",
               malformed: str = "error", name: Optional[str] = None,
               validation_fraction: float = 0.0, validation_seed: int = 0,
               num_folds: int = 0, validation_fold: int = 0,
               num_eval: Optional[int] = None):
    super().__init__(data_dir, train_file=train_file, eval_file=eval_file,
                     labels_file=labels_file, text_field=CLUE_FIELDS.text,
                     label_field=CLUE_FIELDS.label, format="jsonl", malformed=malformed,
                     name=name, validation_fraction=validation_fraction,
                     validation_seed=validation_seed, num_folds=num_folds,
                     validation_fold=validation_fold, num_eval=num_eval)

  def missing_message(self, path: str) -> str:
    task = os.path.basename(os.path.normpath(self.data_dir))
    parent = os.path.dirname(os.path.normpath(self.data_dir)) or "."
    return (f"CLUE data not found: expected {path}. Put train.json and dev.json (CLUE's "
            f"JSON lines) there, fetch them with `python -m tfadv.tools.get_data clue "
            f"--tasks={task} --out={parent}` (or `fewclue`), or set "
            "--gin_param=\"ClueDataset.data_dir = '...'\" (WORKSPACE.md shows the layout).")
