"""Your own labelled files: JSON lines, CSV, TSV, your field names, string labels, sentence pairs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import builders
from tfadv.data.text_files import (Fields, MalformedRecordError, TextFileDataset,
                                   read_text_file)
from tfadv.errors import InputDataError, SettingError
from tfadv.tasks.text import TextClassificationTask

REPO = builders.REPO
PAIRS = [("今天天气好", "天气不错", "same"), ("我要退款", "怎么退货", "same"),
         ("明天下雨", "我饿了", "different"), ("打开空调", "关掉电视", "different")]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                  encoding="utf-8")
  return str(path)


def _pair_files(directory):
  directory.mkdir(exist_ok=True)
  rows = [{"query": a, "candidate": b, "match": y} for a, b, y in PAIRS]
  _write_jsonl(directory / "train.jsonl", rows)
  _write_jsonl(directory / "test.jsonl", rows[::-1])
  return str(directory)


def test_jsonl_with_own_field_names_pairs_and_string_labels(tmp_path):
  ds = TextFileDataset(_pair_files(tmp_path / "task"), train_file="train.jsonl",
                       eval_file="test.jsonl", text_field="query",
                       text_pair_field="candidate", label_field="match")
  texts, labels = ds.examples("train")
  assert texts == [(a, b) for a, b, _ in PAIRS]
  assert labels == [y for _, _, y in PAIRS]
  assert ds.label_names() == ["different", "same"]  # sorted strings
  assert ds.examples("eval")[0][0] == (PAIRS[-1][0], PAIRS[-1][1])
  assert ds.eval_split == "test" and ds.name == "task"


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_with_a_header_and_quoted_fields(tmp_path, suffix, delimiter):
  path = tmp_path / f"train{suffix}"
  path.write_text(f'id{delimiter}review{delimiter}stars\n'
                  f'1{delimiter}"好，很好{delimiter}真的"{delimiter}5\n'
                  f'2{delimiter}"两行\n的评论"{delimiter}1\n'
                  f'3{delimiter}一般{delimiter}3\n', encoding="utf-8")
  split = read_text_file(str(path), Fields("review", None, "stars"))
  assert split.texts == [f"好，很好{delimiter}真的".replace("\t", " "), "两行 的评论", "一般"]
  assert split.labels == ["5", "1", "3"]
  assert split.line_numbers == [2, 3, 5]  # a quoted newline spans a line


def test_labels_file_fixes_the_order_and_ints_sort_by_value(tmp_path):
  rows = [{"text": t, "label": y} for t, y in [("一", 10), ("二", 9), ("三", 10)]]
  _write_jsonl(tmp_path / "train.jsonl", rows)
  _write_jsonl(tmp_path / "dev.jsonl", rows)
  assert TextFileDataset(str(tmp_path)).label_names() == ["9", "10"]
  (tmp_path / "labels.txt").write_text("10\n9\n11\n")
  ds = TextFileDataset(str(tmp_path), labels_file="labels.txt")
  assert ds.label_names() == ["10", "9", "11"]


def test_bad_records_are_one_line_naming_file_line_and_the_binding(tmp_path):
  path = tmp_path / "train.jsonl"
  _write_jsonl(path, [{"text": "好", "label": 1}, {"body": "坏", "label": 0},
                      {"text": "中", "label": 2}])
  with pytest.raises(MalformedRecordError) as info:
    read_text_file(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}:2: record has no string field 'text'")
  assert "'body'" in message and "TextFileDataset.text_field" in message
  assert "\n" not in message
  skipped = read_text_file(str(path), malformed="skip")
  assert skipped.texts == ["好", "中"] and skipped.num_skipped == 1
  csv_path = tmp_path / "train.csv"
  csv_path.write_text("sentence,label\n好,1\n")
  with pytest.raises(InputDataError, match=r"train.csv:1: the header \['sentence', 'label'\] "
                     r"has no column 'text'.*TextFileDataset.text_field"):
    read_text_file(str(csv_path))
  short = tmp_path / "short.tsv"
  short.write_text("text\tlabel\n好\t1\n坏\n")
  with pytest.raises(MalformedRecordError, match=r"short.tsv:3: the row has 1 columns"):
    read_text_file(str(short))
  (tmp_path / "x.data").write_text("a")
  with pytest.raises(InputDataError, match="bind TextFileDataset.format"):
    read_text_file(str(tmp_path / "x.data"))
  with pytest.raises(SettingError, match="TextFileDataset.format = 'xml'"):
    TextFileDataset(str(tmp_path), format="xml")


@pytest.fixture
def no_gin_config():
  import gin  # pylint: disable=g-import-not-at-top
  yield
  gin.clear_config()


def test_bustm_pairs_and_eprstmt_string_labels_read_as_their_configs_say(fewclue_dir,
                                                                         no_gin_config):  # pylint: disable=unused-argument,redefined-outer-name
  builders.configure([], ["configs/bustm_fgm.gin"])
  import gin  # pylint: disable=g-import-not-at-top
  bustm = TextFileDataset(  # the config's bindings, resolved by gin
      **{k: gin.query_parameter(f"TextFileDataset.{k}") for k in (
          "train_file", "eval_file", "text_field", "text_pair_field", "label_field")},
      data_dir=os.path.join(fewclue_dir, "bustm"))
  texts, labels = bustm.examples("train")
  assert len(texts) == 160 and all(isinstance(t, tuple) and len(t) == 2 for t in texts)
  assert texts[0] == ("叫爸爸叫一声我听听", "那你叫我一声爸爸") and labels[0] == "1"
  assert bustm.label_names() == ["0", "1"]
  builders.configure([], ["configs/eprstmt_plain.gin"])
  eprstmt = TextFileDataset(os.path.join(fewclue_dir, "eprstmt"), train_file="train.json",
                            eval_file="dev.json", text_field="sentence")
  assert eprstmt.label_names() == ["Negative", "Positive"]
  assert len(eprstmt.examples("eval")[0]) == 160


def test_pairs_become_cls_a_sep_b_sep_with_segment_ids(tmp_path):
  """Against the layout written out by hand from the task's own vocabulary."""
  ds = TextFileDataset(_pair_files(tmp_path / "task"), train_file="train.jsonl",
                       eval_file="test.jsonl", text_field="query",
                       text_pair_field="candidate", label_field="match")
  task = TextClassificationTask(ds, sequence_length=16, vocabulary_min_count=1, preset=None)
  task.prepare(str(tmp_path / "run"))
  arrays = task.arrays("train")
  vocabulary = task.vocabulary()
  index = {token: i for i, token in enumerate(vocabulary)}
  for row, (a, b, label) in enumerate(PAIRS):
    tokens = ["[CLS]", *a, "[SEP]", *b, "[SEP]"]
    want = [index[t] for t in tokens] + [index["[PAD]"]] * (16 - len(tokens))
    np.testing.assert_array_equal(arrays["token_ids"][row], want)
    segments = [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (16 - len(tokens))
    np.testing.assert_array_equal(arrays["segment_ids"][row], segments)
    np.testing.assert_array_equal(arrays["padding_mask"][row], np.arange(16) < len(tokens))
    assert task.label_names[arrays["label"][row]] == label
  # Both texts built the vocabulary.
  assert all(c in index for a, b, _ in PAIRS for c in a + b)


@pytest.mark.slow
def test_a_jsonl_pair_file_trains_with_fgm_and_evaluates_in_one_command(tmp_path):
  data = _pair_files(tmp_path / "task")
  model_dir = tmp_path / "run"
  flags = ["--gin_file=configs/bustm_fgm.gin", "--gin_file=configs/base/scratch.gin",
           f"--gin_param=TextFileDataset.data_dir = '{data}'",
           "--gin_param=TextFileDataset.train_file = 'train.jsonl'",
           "--gin_param=TextFileDataset.eval_file = 'test.jsonl'",
           "--gin_param=TextFileDataset.text_field = 'query'",
           "--gin_param=TextFileDataset.text_pair_field = 'candidate'",
           "--gin_param=TextFileDataset.label_field = 'match'",
           "--gin_param=Experiment.train_steps = 4", "--gin_param=Experiment.global_batch_size = 2",
           "--gin_param=TextClassificationTask.vocabulary_min_count = 1",
           f"--model_dir={model_dir}"]
  proc = subprocess.run([sys.executable, "-m", "tfadv.main", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final eval accuracy" in proc.stdout
  results = json.loads((model_dir / "eval_results_test.json").read_text())
  assert 0.0 <= results["accuracy"] <= 1.0 and "adv_loss" in proc.stdout
  labels = json.loads((model_dir / "labels.json").read_text())
  assert labels["labels"] == ["different", "same"]


def test_k_folds_partition_train_stratified_and_seeded():
  from tfadv.data.base import carve_fold  # pylint: disable=g-import-not-at-top
  labels = ["a"] * 23 + ["b"] * 9 + ["c"] * 2 + ["d"]
  folds = [carve_fold(labels, 5, j, seed=3) for j in range(5)]
  validations = [set(v.tolist()) for _, v in folds]
  assert sorted(i for v in validations for i in v) == list(range(len(labels)))  # a partition
  for train, validation in folds:
    assert set(train.tolist()) == set(range(len(labels))) - set(validation.tolist())
  for label in "abc":  # each label spread over the folds as evenly as it can be
    counts = [sum(labels[i] == label for i in v) for v in validations]
    assert max(counts) - min(counts) <= 1, (label, counts)
  sizes = [len(v) for v in validations]
  assert max(sizes) - min(sizes) <= 1, sizes
  assert [v.tolist() for _, v in folds] == [carve_fold(labels, 5, j, 3)[1].tolist()
                                            for j in range(5)]
  assert carve_fold(labels, 5, 0, 4)[1].tolist() != folds[0][1].tolist()


def test_a_dataset_validates_on_its_fold_and_trains_on_the_rest(tmp_path):
  rows = [{"text": f"句子{i}", "label": "xy"[i % 2]} for i in range(20)]
  _write_jsonl(tmp_path / "train.jsonl", rows)
  _write_jsonl(tmp_path / "dev.jsonl", rows[:4])
  seen = []
  for fold in range(4):
    ds = TextFileDataset(str(tmp_path), num_folds=4, validation_fold=fold,
                         validation_fraction=0.5)  # folds replace the fraction
    assert ds.splits == ("train", "validation", "eval")
    train, validation = ds.examples("train")[0], ds.examples("validation")[0]
    assert len(validation) == 5 and set(train) | set(validation) == {r["text"] for r in rows}
    assert not set(train) & set(validation)
    seen += validation
  assert sorted(seen) == sorted(r["text"] for r in rows)


def test_num_eval_keeps_the_first_eval_records_under_their_own_split_name(tmp_path):
  _pair_files(tmp_path)
  kwargs = dict(data_dir=str(tmp_path), eval_file="test.jsonl", text_field="query",
                text_pair_field="candidate", label_field="match")
  whole = TextFileDataset(**kwargs)
  first = TextFileDataset(num_eval=3, **kwargs)
  texts, labels = first.examples("eval")
  assert texts == [(a, b) for a, b, _ in PAIRS[::-1][:3]]
  assert labels == [y for _, _, y in PAIRS[::-1][:3]]
  assert first.examples("train") == whole.examples("train")
  assert (whole.eval_split, first.eval_split) == ("test", "test_first3")
  with pytest.raises(SettingError, match="num_eval"):
    TextFileDataset(num_eval=0, **kwargs)
