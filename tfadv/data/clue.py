"""Reader for CLUE classification tasks in JSON-lines format (IFLYTEK, TNEWS).

A CLUE file holds one JSON object per line, with a `sentence`, a `label` id
and a label description (`label_des` in CLUE's full releases, `label_desc` in
TNEWS as FewCLUE ships it).

Records that break the one-record-one-line contract are real: the FewCLUE
IFLYTEK files carry sentences with raw Unicode line separators (U+2028), which
every Unicode-aware reader (`str.splitlines`, most editors) treats as line
breaks, and other dumps carry raw `\\n` inside a string, which splits the JSON
object itself. The reader handles both deliberately, by a policy:

* `"error"` (default): raise `MalformedRecordError` naming `file:line`.
* `"skip"`: drop the record and count it (`ClueSplit.num_skipped`).
* `"repair"`: join a JSON object split over several physical lines and
  replace raw line breaks inside the text by spaces; a record that cannot be
  repaired is skipped and counted.

The same policy covers every other broken record: a line that is not UTF-8,
JSON that is truncated or not an object, a `sentence` that is not a string
or a `label` that is not a string or an integer. A file with no usable
record is an error under every policy. Every error is an `InputDataError`
naming `file:line` and the fix (`tfadv.main` prints it on one line and
exits with status 2).
"""

import dataclasses
import json
import os
from typing import List, Optional, Sequence

import gin
import tensorflow as tf

from tfadv.data.base import TextDataset, carve_validation
from tfadv.errors import InputDataError, MissingInputError

MALFORMED_POLICIES = ("error", "skip", "repair")
# Line terminators other than "\n" that Unicode-aware readers split on.
_RAW_LINE_BREAKS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                    "\u2028", "\u2029")
# A split record is joined over at most this many physical lines.
_MAX_JOINED_LINES = 32
_DESCRIPTION_FIELDS = ("label_des", "label_desc")


class MalformedRecordError(InputDataError):
  """A record that breaks the CLUE JSON-lines format, located by file:line."""

  def __init__(self, path: str, line: int, reason: str):
    self.path, self.line, self.reason = path, line, reason
    super().__init__(
        f"{path}:{line}: {reason}. Set `ClueDataset.malformed = 'skip'` to "
        "drop such records or 'repair' to join and clean them.")


@dataclasses.dataclass
class ClueSplit:
  """The records of one file: texts and their raw (unmapped) label ids."""
  path: str
  texts: List[str]
  labels: List[str]
  label_descriptions: dict
  line_numbers: List[int] = dataclasses.field(default_factory=list)  # of each record
  num_skipped: int = 0
  num_repaired: int = 0


def _has_raw_line_break(text: str) -> Optional[str]:
  for ch in _RAW_LINE_BREAKS:
    if ch in text:
      return ch
  return None


def _clean_text(text: str) -> str:
  for ch in _RAW_LINE_BREAKS + ("\n", "\t"):
    text = text.replace(ch, " ")
  return " ".join(text.split())


def _validate(record, require_label: bool) -> Optional[str]:
  if not isinstance(record, dict):
    return "record is not a JSON object"
  if not isinstance(record.get("sentence"), str):
    return "record has no string field 'sentence'"
  if require_label and "label" not in record:
    return "record has no field 'label'"
  label = record.get("label", "")
  if isinstance(label, bool) or not isinstance(label, (str, int)):
    return f"field 'label' is a {type(label).__name__}, not a string or integer"
  return None


def read_clue_file(path: str, malformed: str = "error",
                   require_label: bool = True) -> ClueSplit:
  """Reads one CLUE JSON-lines file.

  Args:
    path: local or `gs://` path of the file.
    malformed: `"error"`, `"skip"` or `"repair"` (see the module docstring).
    require_label: whether every record must carry a `label`.

  Returns:
    A `ClueSplit` with texts and raw label ids as strings (`"100"`).

  Example:
  >>> split = read_clue_file("../shared/data/fewclue/tnews/dev.json")
  >>> len(split.texts), split.labels[0]
  (1098, '115')
  """
  if malformed not in MALFORMED_POLICIES:
    raise ValueError(f"malformed={malformed!r}; expected one of "
                     f"{MALFORMED_POLICIES}.")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(path)
  with tf.io.gfile.GFile(path, "rb") as f:
    # JSON Lines separates records by "\n" only; decoding ourselves, line by
    # line, keeps U+2028 and friends inside the line where they belong and
    # lets one undecodable line be skipped without losing the file.
    raw_lines = f.read().split(b"\n")
  split = ClueSplit(path=path, texts=[], labels=[], label_descriptions={})
  lines = []
  for line_no, raw in enumerate(raw_lines, 1):
    try:
      lines.append(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      if malformed == "error":
        raise MalformedRecordError(path, line_no, f"the line is not UTF-8 (byte "
                                   f"0x{raw[e.start]:02x} at byte {e.start + 1})") from None
      lines.append(None)  # skipped below, whatever the policy: nothing to repair
  i = 0
  while i < len(lines):
    line_no, line = i + 1, lines[i]
    i += 1
    if line is None:
      split.num_skipped += 1
      continue
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      record = None
      reason = f"invalid JSON ({e.msg} at column {e.colno})"
      if malformed == "repair":
        # A raw newline inside a string splits one object over several lines.
        buffer = line
        for j in range(i, min(i + _MAX_JOINED_LINES, len(lines))):
          if lines[j] is None:
            break
          buffer += "\n" + lines[j]
          try:
            record = json.loads(buffer, strict=False)
          except json.JSONDecodeError:
            continue
          i = j + 1
          split.num_repaired += 1
          break
      if record is None:
        if malformed != "error":  # nothing to join it with: skipped
          split.num_skipped += 1
          continue
        raise MalformedRecordError(path, line_no, reason)
    problem = _validate(record, require_label)
    # Only raw characters in the file split lines; JSON escapes ("\u2028")
    # are harmless and decoded like any other.
    ch = _has_raw_line_break(line)
    if problem is None and ch is not None:
      if malformed == "repair":
        split.num_repaired += 1
      else:
        problem = (f"the record contains a raw line break U+{ord(ch):04X}, so "
                   "it spans several lines for Unicode-aware readers")
    if problem is not None:
      if malformed != "error":
        split.num_skipped += 1
        continue
      raise MalformedRecordError(path, line_no, problem)
    split.texts.append(_clean_text(record["sentence"]))
    label = str(record.get("label", ""))
    split.labels.append(label)
    split.line_numbers.append(line_no)
    for field in _DESCRIPTION_FIELDS:
      if field in record:
        split.label_descriptions.setdefault(label, record[field])
  if not split.texts:
    raise InputDataError(
        f"{path}: no usable record ({split.num_skipped} skipped); a CLUE file holds "
        "one JSON object a line with a 'sentence' (and a 'label'): check the file "
        "or point ClueDataset at another.")
  return split


def read_label_file(path: str) -> List[str]:
  """Reads CLUE's `labels.json` (one `{"label": ..}` object a line)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  fix = "fix the file, or set ClueDataset.labels_file = None to take the labels from train"
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise InputDataError(f"{path}:{line}: the line is not UTF-8; {fix}.") from None
  decoder, labels, pos = json.JSONDecoder(), [], 0
  # FewCLUE's labels.json has no newline at its end; decode object by object.
  while pos < len(text):
    while pos < len(text) and text[pos].isspace():
      pos += 1
    if pos >= len(text):
      break
    line = text.count("\n", 0, pos) + 1
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise InputDataError(f"{path}:{line}: invalid JSON ({e.msg}); {fix}.") from None
    if not isinstance(record, dict) or "label" not in record:
      raise InputDataError(f"{path}:{line}: not a {{\"label\": ...}} object; {fix}.")
    labels.append(str(record["label"]))
  if not labels:
    raise InputDataError(f"{path}: no labels; {fix}.")
  return labels


def _sort_labels(labels: Sequence[str]) -> List[str]:
  return sorted(set(labels), key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))


@gin.configurable
class ClueDataset(TextDataset):
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

  Example:
  >>> ds = ClueDataset("../shared/data/fewclue/tnews")
  >>> len(ds.label_names())
  15
  """

  def __init__(self, data_dir: str = gin.REQUIRED, train_file: str = "train.json",
               eval_file: str = "dev.json", labels_file: Optional[str] = "labels.json",
               malformed: str = "error", name: Optional[str] = None,
               validation_fraction: float = 0.0, validation_seed: int = 0):
    self.data_dir = data_dir
    self.validation_fraction = validation_fraction
    self.validation_seed = validation_seed
    self.train_file = train_file
    self.eval_file = eval_file
    self.labels_file = labels_file
    self.malformed = malformed
    self.name = name or os.path.basename(os.path.normpath(data_dir))
    self._cache = {}

  @property
  def eval_split(self) -> str:
    """The evaluated split's name, from its file: "dev" for dev.json."""
    return os.path.splitext(os.path.basename(self.eval_file))[0]

  def _path(self, file_name: str) -> str:
    if os.path.isabs(file_name) or "://" in file_name or os.sep in file_name:
      return file_name
    return os.path.join(self.data_dir, file_name)

  def _check_exists(self, path: str):
    if not tf.io.gfile.exists(path):
      raise MissingInputError(
          f"CLUE data not found: expected {path}. Put train.json and dev.json "
          "(CLUE's JSON lines; from github.com/CLUEbenchmark/CLUE or FewCLUE's "
          "datasets/) there, or set --gin_param=\"ClueDataset.data_dir = '...'\" "
          "(WORKSPACE.md shows the layout).")

  @property
  def splits(self):
    return ("train", "validation", "eval") if self.validation_fraction else ("train", "eval")

  def split(self, which: str) -> ClueSplit:
    """The whole train file (`"train"`) or the eval file (`"eval"`), read once and cached."""
    path = self._path(self.train_file if which == "train" else self.eval_file)
    if path not in self._cache:
      self._check_exists(path)
      self._cache[path] = read_clue_file(path, self.malformed)
    return self._cache[path]

  def label_names(self) -> List[str]:
    """Raw label ids in class-index order."""
    if self.labels_file:
      path = self._path(self.labels_file)
      if tf.io.gfile.exists(path):
        return read_label_file(path)
    return _sort_labels(self.split("train").labels)

  def examples(self, which: str):
    """(texts, raw labels) of "train" (less validation), "validation" or "eval"."""
    self.check_split(which)
    if which == "eval":
      split = self.split("eval")
      return split.texts, split.labels
    split = self.split("train")
    if not self.validation_fraction:
      return split.texts, split.labels
    train, validation = carve_validation(split.labels, self.validation_fraction,
                                         self.validation_seed)
    chosen = train if which == "train" else validation
    return [split.texts[i] for i in chosen], [split.labels[i] for i in chosen]

  def where(self, split: str, label: str) -> str:
    """`file:line` of the first record of `split` labelled `label`."""
    records = self.split("eval" if split == "eval" else "train")
    line = records.line_numbers[records.labels.index(label)]
    return f"{records.path}:{line}"
