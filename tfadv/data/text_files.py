"""Labelled text files: JSON lines, CSV and TSV, single texts or sentence pairs, with your field names.

`TextFileDataset` reads a task from two files (train, eval) and an optional
labels file. You name the fields: the text, an optional second text (a
sentence pair, `[CLS] a [SEP] b [SEP]` with segment ids), the label (an int or
a string). The label set comes from the labels file when there is one, else
from train (sorted: numbers by value, then strings); the model dir keeps the
mapping it trained with. CLUE's tasks are one preset of it
(`tfadv.data.clue.ClueDataset`: field `sentence`, files `train.json` /
`dev.json` / `labels.json`).

Formats, by extension unless `format` is bound: `.json` / `.jsonl` JSON lines
(one object a line); `.csv` comma-separated and `.tsv` tab-separated, each
with a header row naming the fields (Python's `csv` module: quoted fields
may hold commas, tabs and newlines).

Records that break the one-record-one-line contract are real: the FewCLUE
IFLYTEK files carry sentences with raw Unicode line separators (U+2028), which
every Unicode-aware reader (`str.splitlines`, most editors) treats as line
breaks, and other dumps carry raw `\\n` inside a string, which splits the JSON
object itself. The reader handles both deliberately, by a policy:

* `"error"` (default): raise `MalformedRecordError` naming `file:line`.
* `"skip"`: drop the record and count it (`TextSplit.num_skipped`).
* `"repair"`: join a JSON object split over several physical lines and
  replace raw line breaks inside the text by spaces; a record that cannot be
  repaired is skipped and counted.

The same policy covers every other broken record: a line that is not UTF-8,
JSON that is truncated or not an object, a text field missing or not a
string, a label that is not a string or an integer, a CSV row with too few
columns. A file with no usable record is an error under every policy.
Every error is an `InputDataError` naming `file:line` and the fix
(`tfadv.main` prints it on one line and exits with status 2).

Example (a JSONL file of your own, pairs, string labels):
>>> ds = TextFileDataset("/data/my_task", train_file="train.jsonl",
...                      eval_file="test.jsonl", text_field="query",
...                      text_pair_field="candidate", label_field="match")
>>> texts, labels = ds.examples("train")   # texts: [(query, candidate), ...]
"""

import csv
import dataclasses
import io
import json
import os
from typing import List, Optional, Sequence, Tuple, Union

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.data.base import TextDataset, carve_fold, carve_validation
from tfadv.errors import InputDataError, MissingInputError, SettingError

MALFORMED_POLICIES = ("error", "skip", "repair")
# Line terminators other than "\n" that Unicode-aware readers split on.
_RAW_LINE_BREAKS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                    "\u2028", "\u2029")
# A split record is joined over at most this many physical lines.
_MAX_JOINED_LINES = 32
_DESCRIPTION_FIELDS = ("label_des", "label_desc")


FORMATS = ("auto", "jsonl", "csv", "tsv")
Text = Union[str, Tuple[str, str]]  # a text, or a sentence pair


class MalformedRecordError(InputDataError):
  """A record that breaks its file's format, located by file:line."""

  def __init__(self, path: str, line: int, reason: str, owner: str = "TextFileDataset"):
    self.path, self.line, self.reason = path, line, reason
    super().__init__(
        f"{path}:{line}: {reason}. Set `{owner}.malformed = 'skip'` to "
        "drop such records or 'repair' to join and clean them.")


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which fields of a record hold the text, the second text and the label."""
  text: str = "text"
  text_pair: Optional[str] = None
  label: str = "label"
  owner: str = "TextFileDataset"  # the configurable named in error messages


@dataclasses.dataclass
class TextSplit:
  """The records of one file: texts (or pairs) and their raw (unmapped) labels."""
  path: str
  texts: List[Text]
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


def _validate(record, require_label: bool, fields: Fields) -> Optional[str]:
  if not isinstance(record, dict):
    return "record is not a JSON object"
  for name in (fields.text, fields.text_pair):
    if name is not None and not isinstance(record.get(name), str):
      return (f"record has no string field {name!r} (its fields: "
              f"{', '.join(map(repr, record))}; bind {fields.owner}."
              f"{'text_pair_field' if name == fields.text_pair else 'text_field'})")
  if require_label and fields.label not in record:
    return (f"record has no field {fields.label!r} (its fields: "
            f"{', '.join(map(repr, record))}; bind {fields.owner}.label_field)")
  label = record.get(fields.label, "")
  if isinstance(label, bool) or not isinstance(label, (str, int)):
    return f"field {fields.label!r} is a {type(label).__name__}, not a string or integer"
  return None


def _text(record, fields: Fields) -> Text:
  if fields.text_pair is None:
    return _clean_text(record[fields.text])
  return (_clean_text(record[fields.text]), _clean_text(record[fields.text_pair]))


def file_format(path: str, format_: str = "auto") -> str:
  """"jsonl", "csv" or "tsv": `format_`, or from the file's extension."""
  if format_ != "auto":
    return format_
  extension = os.path.splitext(path)[1].lower()
  found = {".json": "jsonl", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(extension)
  if found is None:
    raise InputDataError(f"{path}: cannot tell the format from {extension or 'no extension'!r}; "
                         "bind TextFileDataset.format to 'jsonl', 'csv' or 'tsv'.")
  return found


def read_text_file(path: str, fields: Fields = Fields(), malformed: str = "error",
                   require_label: bool = True, format_: str = "auto") -> TextSplit:
  """Reads one labelled text file (JSON lines, CSV or TSV).

  Args:
    path: local or `gs://` path of the file.
    fields: the text, second text and label fields.
    malformed: `"error"`, `"skip"` or `"repair"` (see the module docstring).
    require_label: whether every record must carry a label.
    format_: "auto" (by extension), "jsonl", "csv" or "tsv".

  Returns:
    A `TextSplit` with texts (pairs as tuples) and raw labels as strings.

  Example:
  >>> split = read_text_file("../shared/data/fewclue/bustm/dev.json",
  ...                        Fields("sentence1", "sentence2"))
  >>> len(split.texts), split.labels[0]
  (160, '0')
  """
  checks.check(fields.owner, malformed=(malformed, checks.one_of(MALFORMED_POLICIES)))
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(path)
  kind = file_format(path, format_)
  if kind != "jsonl":
    return _read_delimited(path, fields, malformed, require_label,
                           "," if kind == "csv" else "\t")
  with tf.io.gfile.GFile(path, "rb") as f:
    # JSON Lines separates records by "\n" only; decoding ourselves, line by
    # line, keeps U+2028 and friends inside the line where they belong and
    # lets one undecodable line be skipped without losing the file.
    raw_lines = f.read().split(b"\n")
  split = TextSplit(path=path, texts=[], labels=[], label_descriptions={})
  lines = []
  for line_no, raw in enumerate(raw_lines, 1):
    if raw.endswith(b"\r"):  # "\r\n" ends a line too (Windows files: FewCLUE's BUSTM)
      raw = raw[:-1]
    try:
      lines.append(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      if malformed == "error":
        raise MalformedRecordError(path, line_no, f"the line is not UTF-8 (byte "
                                   f"0x{raw[e.start]:02x} at byte {e.start + 1})",
                                   fields.owner) from None
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
        raise MalformedRecordError(path, line_no, reason, fields.owner)
    problem = _validate(record, require_label, fields)
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
      raise MalformedRecordError(path, line_no, problem, fields.owner)
    split.texts.append(_text(record, fields))
    label = str(record.get(fields.label, ""))
    split.labels.append(label)
    split.line_numbers.append(line_no)
    for field in _DESCRIPTION_FIELDS:
      if field in record:
        split.label_descriptions.setdefault(label, record[field])
  return _checked(split, fields, "one JSON object a line")


def _checked(split: TextSplit, fields: Fields, layout: str) -> TextSplit:
  if not split.texts:
    wanted = " and ".join(repr(f) for f in (fields.text, fields.text_pair) if f)
    raise InputDataError(
        f"{split.path}: no usable record ({split.num_skipped} skipped); expected "
        f"{layout} with {wanted} (and {fields.label!r}): check the file or bind "
        f"{fields.owner}'s fields.")
  return split


def _read_delimited(path: str, fields: Fields, malformed: str, require_label: bool,
                    delimiter: str) -> TextSplit:
  """CSV or TSV with a header row naming the fields."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  split = TextSplit(path=path, texts=[], labels=[], label_descriptions={})
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise MalformedRecordError(path, line, "the line is not UTF-8 (convert the file "
                               "to UTF-8)", fields.owner) from None
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  try:
    header = next(reader)
  except StopIteration:
    header = []
  wanted = [f for f in (fields.text, fields.text_pair) if f] + (
      [fields.label] if require_label else [])
  missing = [f for f in wanted if f not in header]
  if missing:
    raise InputDataError(
        f"{path}:1: the header {header} has no column {missing[0]!r}; a CSV/TSV file "
        f"starts with a header row naming its columns: bind {fields.owner}."
        f"{'label_field' if missing[0] == fields.label else 'text_field'} to one of them.")
  column = {name: header.index(name) for name in header}
  while True:
    line_no = reader.line_num + 1
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      if malformed == "error":
        raise MalformedRecordError(path, line_no, f"unreadable row ({e})", fields.owner) from None
      split.num_skipped += 1
      continue
    if not row or all(not cell.strip() for cell in row):
      continue
    problem = None
    if len(row) < len(header):
      problem = f"the row has {len(row)} columns, the header {len(header)}"
    elif require_label and not row[column[fields.label]].strip():
      problem = f"empty {fields.label!r}"
    if problem is not None:
      if malformed == "error":
        raise MalformedRecordError(path, line_no, problem, fields.owner)
      split.num_skipped += 1
      continue
    record = {name: row[i] for name, i in column.items()}
    split.texts.append(_text(record, fields))
    split.labels.append(record.get(fields.label, "").strip())
    split.line_numbers.append(line_no)
  return _checked(split, fields, "a header row and one record a row")


def read_label_file(path: str, owner: str = "TextFileDataset") -> List[str]:
  """Reads a labels file: CLUE's `labels.json` (one `{"label": ..}` object a
  line) or plain text (`.txt`: one label a line)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  fix = f"fix the file, or set {owner}.labels_file = None to take the labels from train"
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise InputDataError(f"{path}:{line}: the line is not UTF-8; {fix}.") from None
  if path.lower().endswith(".txt"):
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
      raise InputDataError(f"{path}: no labels; {fix}.")
    return labels
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
class TextFileDataset(TextDataset):
  """A labelled text task from your own files (see the module docstring).

  Args:
    data_dir: directory of the files (file names below are relative to it;
      an absolute or `gs://` path is used as it is).
    train_file: the training split.
    eval_file: the evaluated (reported) split.
    labels_file: optional label list (`.json`: CLUE's `{"label": ..}` lines;
      `.txt`: one label a line) fixing the label set and its order; `None`
      or a missing file: the labels of train, sorted.
    text_field: the field (JSON key or CSV/TSV column) holding the text.
    text_pair_field: the second text of a sentence pair, or None.
    label_field: the label's field (an int or a string).
    format: "auto" (from the extension), "jsonl", "csv" or "tsv".
    malformed: policy for malformed records: "error", "skip" or "repair".
    name: the task's name (default: the data dir's name).
    validation_fraction: the share of train carved off as the "validation"
      split (stratified by label, seeded; `tfadv.data.base.carve_validation`),
      on which the experiment selects its checkpoint; 0: none.
    validation_seed: the carving's seed (and the folds').
    num_folds: K > 1: the validation split is fold `validation_fold` of a
      stratified K-fold partition of train (`tfadv.data.base.carve_fold`),
      replacing `validation_fraction`: k-fold cross-validation, one run per
      fold (`tfadv.tools.methods_table --cv_folds`). 0: no folds.
    validation_fold: which fold validates (0 .. K − 1).
    num_eval: evaluate the first N records of the eval file only (None: all);
      the split is then named "<eval>_first<N>" (`eval_results_dev_first200.json`),
      so an evaluation of a subset is recorded beside the whole file's, never
      over it (as `ImageDataset.num_eval`). For costly evaluations (the
      tight character attack). The first N of a file sorted by label cover
      few classes (FewCLUE's dev: the first 200 are 3 of TNEWS's 15 classes,
      8 of IFLYTEK's 119): shuffle such a file first if the subset should
      stand for the whole.

  Example:
  >>> ds = TextFileDataset("../shared/data/fewclue/bustm", train_file="train.json",
  ...                      eval_file="dev.json", text_field="sentence1",
  ...                      text_pair_field="sentence2")
  >>> ds.label_names()
  ['0', '1']
  """

  owner = "TextFileDataset"

  def __init__(self, data_dir: str = "", train_file: str = "train.jsonl",
               eval_file: str = "dev.jsonl", labels_file: Optional[str] = None,
               text_field: str = "text", text_pair_field: Optional[str] = None,
               label_field: str = "label", format: str = "auto",  # pylint: disable=redefined-builtin
               malformed: str = "error", name: Optional[str] = None,
               validation_fraction: float = 0.0, validation_seed: int = 0,
               num_folds: int = 0, validation_fold: int = 0,
               num_eval: Optional[int] = None):
    checks.check(self.owner, malformed=(malformed, checks.one_of(MALFORMED_POLICIES)),
                 num_eval=(num_eval, checks.AT_LEAST_ONE),
                 format=(format, checks.one_of(FORMATS)),
                 validation_fraction=(validation_fraction, checks.OPEN_FRACTION),
                 num_folds=(num_folds, checks.NON_NEGATIVE_INT),
                 validation_fold=(validation_fold, checks.NON_NEGATIVE_INT))
    if num_folds == 1 or (num_folds and validation_fold >= num_folds):
      raise SettingError(f"{self.owner}.num_folds = {num_folds}, validation_fold = "
                         f"{validation_fold}: expected num_folds >= 2 and validation_fold "
                         "< num_folds (or num_folds = 0: no folds).")
    for key, value in (("text_field", text_field), ("label_field", label_field),
                       ("text_pair_field", text_pair_field)):
      if value is not None and (not isinstance(value, str) or not value):
        raise SettingError(f"{self.owner}.{key} = {value!r}: expected a field name.")
    self.data_dir = data_dir
    self.train_file = train_file
    self.eval_file = eval_file
    self.labels_file = labels_file
    self.fields = Fields(text_field, text_pair_field, label_field, self.owner)
    self.format = format
    self.malformed = malformed
    self.validation_fraction = validation_fraction
    self.validation_seed = validation_seed
    self.num_folds = num_folds
    self.validation_fold = validation_fold
    self.num_eval = num_eval
    self.name = name or os.path.basename(os.path.normpath(data_dir or train_file)) or "text"
    self._cache = {}

  @property
  def is_pair(self) -> bool:
    """Whether examples are sentence pairs."""
    return self.fields.text_pair is not None

  @property
  def eval_split(self) -> str:
    """The evaluated split's name, from its file: "dev" for dev.json
    ("dev_first200" with `num_eval` 200)."""
    base = os.path.splitext(os.path.basename(self.eval_file))[0]
    return base if not self.num_eval else f"{base}_first{self.num_eval}"

  def _path(self, file_name: str) -> str:
    if os.path.isabs(file_name) or "://" in file_name or not self.data_dir:
      return file_name
    return os.path.join(self.data_dir, file_name)

  def missing_message(self, path: str) -> str:
    return (f"Data not found: expected {path}. Bind {self.owner}.data_dir (and "
            f"train_file / eval_file) to your files; WORKSPACE.md shows the layout.")

  @property
  def splits(self):
    return (("train", "validation", "eval") if self.validation_fraction or self.num_folds
            else ("train", "eval"))

  def split(self, which: str) -> TextSplit:
    """The whole train file (`"train"`) or the eval file (`"eval"`), read once and cached."""
    path = self._path(self.train_file if which == "train" else self.eval_file)
    if path not in self._cache:
      if not tf.io.gfile.exists(path):
        raise MissingInputError(self.missing_message(path))
      self._cache[path] = read_text_file(path, self.fields, self.malformed,
                                         format_=self.format)
    return self._cache[path]

  def label_names(self) -> List[str]:
    """Raw labels in class-index order."""
    if self.labels_file:
      path = self._path(self.labels_file)
      if tf.io.gfile.exists(path):
        return read_label_file(path, self.owner)
    return _sort_labels(self.split("train").labels)

  def examples(self, which: str):
    """(texts or pairs, raw labels) of "train" (less validation), "validation" or "eval"."""
    self.check_split(which)
    if which == "eval":
      split = self.split("eval")
      return split.texts[:self.num_eval], split.labels[:self.num_eval]
    split = self.split("train")
    if self.num_folds:  # k-fold cross-validation: fold `validation_fold` validates
      train, validation = carve_fold(split.labels, self.num_folds, self.validation_fold,
                                     self.validation_seed)
    elif self.validation_fraction:
      train, validation = carve_validation(split.labels, self.validation_fraction,
                                           self.validation_seed)
    else:
      return split.texts, split.labels
    chosen = train if which == "train" else validation
    return [split.texts[i] for i in chosen], [split.labels[i] for i in chosen]

  def where(self, split: str, label: str) -> str:
    """`file:line` of the first record of `split` labelled `label`."""
    records = self.split("eval" if split == "eval" else "train")
    line = records.line_numbers[records.labels.index(label)]
    return f"{records.path}:{line}"
