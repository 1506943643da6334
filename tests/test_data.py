"""CLUE reader, malformed-record policies, vocabulary and input pipeline."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfadv.data import clue, pipeline, vocab
from tfadv.data.reviews import ProductReviews
from tfadv.errors import InputDataError


def test_tnews_records_and_label_mapping(fewclue_dir):
  ds = clue.ClueDataset(os.path.join(fewclue_dir, "tnews"))
  texts, labels = ds.examples("train")
  assert len(texts) == 1185 and len(ds.examples("eval")[0]) == 1098
  names = ds.label_names()
  # labels.json: 15 ids from 100 to 116 with gaps (105 and 111 are unused).
  assert len(names) == 15 and names[0] == "100" and names[-1] == "116"
  assert "105" not in names and "111" not in names
  assert set(labels) <= set(names)
  # TNEWS spells the description field `label_desc`.
  assert ds.split("train").label_descriptions["100"] == "news_story"


def test_label_des_spelling_is_read_too(tmp_path):
  path = tmp_path / "train.json"
  path.write_text('{"label": "3", "label_des": "x", "sentence": "a"}\n'
                  '{"label": "1", "label_desc": "y", "sentence": "b"}\n', "utf-8")
  split = clue.read_clue_file(str(path))
  assert split.label_descriptions == {"3": "x", "1": "y"}
  ds = clue.ClueDataset(str(tmp_path), labels_file=None)
  assert ds.label_names() == ["1", "3"]


def test_iflytek_malformed_record_errors_with_file_and_line(fewclue_dir):
  path = os.path.join(fewclue_dir, "iflytek", "train.json")
  with pytest.raises(clue.MalformedRecordError) as info:
    clue.read_clue_file(path)
  # Line 2313 is the first record with raw U+2028 line separators.
  assert info.value.line == 2313
  assert f"{path}:2313:" in str(info.value)
  assert "U+2028" in str(info.value)


@pytest.mark.parametrize("split_name,valid,broken", [("train", 3022, 2), ("dev", 1368, 5)])
def test_iflytek_skip_counts_and_repair_keeps(fewclue_dir, split_name, valid, broken):
  path = os.path.join(fewclue_dir, "iflytek", f"{split_name}.json")
  skipped = clue.read_clue_file(path, malformed="skip")
  assert (len(skipped.texts), skipped.num_skipped) == (valid, broken)
  repaired = clue.read_clue_file(path, malformed="repair")
  assert (len(repaired.texts), repaired.num_repaired) == (valid + broken, broken)
  assert not any("\u2028" in t for t in repaired.texts)


def test_object_split_by_raw_newline(tmp_path):
  path = tmp_path / "dev.json"
  path.write_text('{"label": "1", "sentence": "ok"}\n'
                  '{"label": "2", "sentence": "first half\nsecond half"}\n'
                  '{"label": "1", "sentence": "ok again"}\n', "utf-8")
  with pytest.raises(clue.MalformedRecordError, match=r"dev.json:2: invalid JSON"):
    clue.read_clue_file(str(path))
  skipped = clue.read_clue_file(str(path), malformed="skip")
  # Both fragments are unreadable lines; the good records survive.
  assert skipped.texts == ["ok", "ok again"] and skipped.num_skipped == 2
  repaired = clue.read_clue_file(str(path), malformed="repair")
  assert repaired.texts == ["ok", "first half second half", "ok again"]
  assert repaired.labels == ["1", "2", "1"]


def test_record_without_sentence_names_line(tmp_path):
  path = tmp_path / "train.json"
  path.write_text('{"label": "1", "sentence": "ok"}\n{"label": "1"}\n', "utf-8")
  with pytest.raises(clue.MalformedRecordError, match=r"train.json:2: record has no string field 'sentence'"):
    clue.read_clue_file(str(path))


def test_missing_data_names_expected_files(tmp_path):
  ds = clue.ClueDataset(str(tmp_path / "tnews"))
  with pytest.raises(FileNotFoundError) as info:
    ds.examples("train")
  message = str(info.value)
  assert str(tmp_path / "tnews" / "train.json") in message
  assert "dev.json" in message and "WORKSPACE.md" in message
  assert f"python -m tfadv.tools.get_data clue --tasks=tnews --out={tmp_path}" in message


def test_product_reviews_split_is_fixed_and_disjoint():
  a = ProductReviews(num_train=300, num_eval=100, seed=3)
  b = ProductReviews(num_train=300, num_eval=100, seed=3)
  assert a.examples("train") == b.examples("train")
  train, evaluation = set(a.examples("train")[0]), set(a.examples("eval")[0])
  assert not train & evaluation
  assert set(a.examples("train")[1]) == {"neg", "pos"}


def test_char_vocabulary_and_wordpiece():
  words = vocab.build_char_vocabulary(["好评好评！", "差评", "iPhone好"], min_count=2)
  assert words[:5] == list(vocab.SPECIAL_TOKENS)
  # After the fixed ASCII block: 好 and 评 (3 each, ties by code point);
  # 差 and ！ appear once and are left out at min_count=2.
  tail = words[5 + 72:]
  assert tail == sorted(["好", "评"]) and "差" not in words
  import keras_hub  # pylint: disable=g-import-not-at-top
  tok = keras_hub.models.BertTokenizer(vocabulary=words, lowercase=True)
  ids = np.asarray(tok(tf.constant("iPhone好"))).tolist()
  assert [words[i] for i in ids] == ["i", "##p", "##h", "##o", "##n", "##e", "好"]


def _collect(strategy, arrays, batch, steps, **kw):
  ds = pipeline.distributed_dataset(strategy, arrays, batch, num_steps=steps, **kw)
  out = []
  for element in ds:
    parts = strategy.experimental_local_results(element["x"])
    out.append(np.concatenate([p.numpy() for p in parts]))
  return out


def test_pipeline_epochs_are_permutations_and_resume_is_exact():
  arrays = {"x": np.arange(10, dtype=np.int32)}
  strategy = tf.distribute.get_strategy()
  batches = _collect(strategy, arrays, 5, 6, shuffle=True, seed=7)
  epochs = np.concatenate(batches).reshape(3, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  resumed = _collect(strategy, arrays, 5, 2, shuffle=True, seed=7, start_step=4)
  np.testing.assert_array_equal(np.stack(resumed), np.stack(batches[4:6]))


def test_pipeline_replicas_split_each_global_batch(mirrored):
  arrays = {"x": np.arange(12, dtype=np.int32)}
  one = _collect(tf.distribute.get_strategy(), arrays, 4, 3, shuffle=True, seed=1)
  two = _collect(mirrored, arrays, 4, 3, shuffle=True, seed=1)
  np.testing.assert_array_equal(np.stack(one), np.stack(two))


def test_eval_pipeline_pads_last_batch_with_zero_weight():
  arrays = {"x": np.arange(5, dtype=np.int32)}
  ds = pipeline.distributed_dataset(tf.distribute.get_strategy(), arrays, 4, shuffle=False)
  batches = list(ds)
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[1][pipeline.WEIGHTS].numpy(), [1, 0, 0, 0])
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:5], np.arange(5))


# --- broken input: read, skipped and counted, or one line naming file:line ---------

GOOD = b'{"label": "1", "sentence": "\xe5\xa5\xbd"}\n'  # 好
# name: (bytes of a CLUE file with one good record around the broken one,
#        the policies under which it is skipped and counted (else read or error))
BROKEN_CLUE = {
    "undecodable_bytes": GOOD + b'{"label": "2", "sentence": "\xff\xfe bad"}\n' + GOOD,
    "truncated_json": GOOD + b'{"label": "2", "sentence": "cut he' + b"\n" + GOOD,
    "sentence_not_a_string": GOOD + b'{"label": "2", "sentence": 42}\n' + GOOD,
    "label_a_list": GOOD + b'{"label": [2], "sentence": "x"}\n' + GOOD,
    "not_an_object": GOOD + b'["label", "sentence"]\n' + GOOD,
    "binary_garbage": GOOD + bytes(b for b in range(256) if b != 10) * 4 + b"\n" + GOOD,
}


@pytest.mark.parametrize("name", sorted(BROKEN_CLUE))
def test_clue_reader_skips_and_counts_or_names_the_line_of_each_broken_record(name, tmp_path):
  path = tmp_path / "train.json"
  path.write_bytes(BROKEN_CLUE[name])
  with pytest.raises(clue.MalformedRecordError) as info:
    clue.read_clue_file(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}:2: ") and "\n" not in message
  assert "ClueDataset.malformed = 'skip'" in message  # the fix
  for policy in ("skip", "repair"):
    split = clue.read_clue_file(str(path), malformed=policy)
    assert split.texts == ["好", "好"] and split.line_numbers == [1, 3], policy
    assert split.num_skipped == 1, policy


def test_empty_and_all_broken_clue_files_are_one_line_errors(tmp_path):
  for content in (b"", b"\n\n", b"\xff\n\xfe\n"):
    path = tmp_path / "train.json"
    path.write_bytes(content)
    with pytest.raises(InputDataError, match=r"no usable record .*check the file"):
      clue.read_clue_file(str(path), malformed="skip")


def test_a_ten_megabyte_record_is_read(tmp_path):
  path = tmp_path / "train.json"
  path.write_bytes(GOOD + b'{"label": "2", "sentence": "' + b"\xe5\xa5\xbd" * 3_500_000 + b'"}\n')
  split = clue.read_clue_file(str(path))
  assert split.labels == ["1", "2"] and len(split.texts[1]) == 3_500_000


def test_unknown_labels_and_broken_label_files_name_file_and_line(tmp_path):
  from tfadv.tasks.text import TextClassificationTask  # pylint: disable=g-import-not-at-top
  (tmp_path / "train.json").write_bytes(GOOD + GOOD.replace(b'"1"', b'"2"'))
  (tmp_path / "dev.json").write_bytes(GOOD + GOOD.replace(b'"1"', b'"7"'))
  task = TextClassificationTask(dataset=clue.ClueDataset(str(tmp_path)), vocabulary_size=50,
                                preset=None)
  # Found before any training, at prepare.
  with pytest.raises(InputDataError) as info:
    task.prepare(str(tmp_path / "model"))
  assert str(info.value).startswith(f"{tmp_path / 'dev.json'}:2: label '7' is not among "
                                    "the model's 2 classes")
  for content, where in ((b'{"label": "1"}\n\xff\n', ":2: the line is not UTF-8"),
                         (b'{"label": "1"}\n{"label": \n', ":2: invalid JSON"),
                         (b'{"label": "1"}\n["x"]\n', ":2: not a"), (b"", ": no labels")):
    (tmp_path / "labels.json").write_bytes(content)
    with pytest.raises(InputDataError, match="labels_file = None") as info:
      clue.read_label_file(str(tmp_path / "labels.json"))
    assert where in str(info.value)


def test_idx_and_review_readers_on_broken_files(tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  from tfadv.data.images import IdxFormatError, read_idx  # pylint: disable=g-import-not-at-top
  from tfadv.data.reviews import read_review_file  # pylint: disable=g-import-not-at-top
  from tfadv.errors import InputDataError  # pylint: disable=g-import-not-at-top
  good = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
  cases = {"empty": b"", "garbage.gz": b"\x1f\x8b garbage", "cut.gz": gzip.compress(good)[:-6],
           "short": good[:-1], "binary": bytes(range(256))}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(IdxFormatError) as info:
      read_idx(str(tmp_path / name))
    assert isinstance(info.value, InputDataError) and str(info.value).startswith(
        str(tmp_path / name)), name
  (tmp_path / "ok.gz").write_bytes(gzip.compress(good))
  np.testing.assert_array_equal(read_idx(str(tmp_path / "ok.gz")), [1, 2, 3])
  # Reviews: one a line; undecodable lines skipped and counted, blank ones dropped.
  (tmp_path / "pos.txt").write_bytes("很好\n".encode() + b"\xff\xfe\n\n" + "  不错  啊\n".encode())
  assert read_review_file(str(tmp_path / "pos.txt")) == (["很好", "不错 啊"], 1)
  (tmp_path / "empty.txt").write_bytes(b"")
  assert read_review_file(str(tmp_path / "empty.txt")) == ([], 0)


def test_pretraining_corpus_skips_broken_lines_and_names_an_empty_file(tmp_path):
  from tfadv.data.corpus import PretrainingCorpus  # pylint: disable=g-import-not-at-top
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "unlabeled.json").write_bytes(
      b'{"sentence": "\xe5\xa5\xbd"}\n\xff\xfe\n{"sentence": "cut\n' + b'{"sentence": 3}\n'
      + b'{"sentence": "\xe5\x9d\x8f"}\n')
  (tmp_path / "a" / "train.json").write_bytes(GOOD)
  corpus = PretrainingCorpus(str(tmp_path), unlabeled_files=["a/unlabeled.json"],
                             train_files=["a/train.json"], num_eval=1)
  held_out, train = corpus.examples("eval")[0], corpus.examples("train")[0]
  assert sorted(held_out + train) == ["坏", "好", "好"]  # the three readable sentences
  (tmp_path / "a" / "unlabeled.json").write_bytes(b"\xff\n")
  with pytest.raises(InputDataError, match="unlabeled.json: no usable record"):
    PretrainingCorpus(str(tmp_path), unlabeled_files=["a/unlabeled.json"],
                      train_files=["a/train.json"], num_eval=1).examples("train")


# --- example sources ---------------------------------------------------------------


def test_an_array_source_has_its_arrays_specs_and_spreads_rows_evenly_in_order():
  from tfadv.data import records, sources  # pylint: disable=g-import-not-at-top
  arrays = {"image": np.zeros((10, 6, 5, 3), np.uint8), "label": np.arange(10, dtype=np.int64)}
  source = sources.ArraySource(arrays)
  assert source.specs == {"image": tf.TensorSpec((6, 5, 3), tf.uint8),
                          "label": tf.TensorSpec((), tf.int64)}
  # 4 of 10 rows evenly spaced, first and last included, in order; all 10 of 20.
  assert source.spread(4)["label"].tolist() == [0, 3, 6, 9]
  assert source.spread(20)["label"].tolist() == list(range(10))
  assert source.spread(1)["label"].tolist() == [0]
  # What a pod slice's input pipeline (no Python) can and cannot read.
  assert not source.reads_in_python and not records.FixedRecordSource.reads_in_python
  assert sources.PythonReadSource.reads_in_python and records.ArrayRecordSource.reads_in_python
  assert sources.TfdsSource.reads_in_python


def test_a_pipeline_by_default_starts_at_step_0_of_seed_0_and_replays_nothing():
  """What `distributed_dataset` and `input_fn` give a caller that sets only
  the batch size and shuffle: the first batches in order, seed 0's shuffle."""
  arrays = {"x": np.arange(12, dtype=np.int64)}
  strategy = tf.distribute.get_strategy()

  def first(dataset, n=3):
    return [b["x"].numpy().tolist() for b, _ in zip(iter(dataset), range(n))]

  assert first(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=False)) == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
  shuffled = first(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=True))
  assert shuffled == first(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=True,
                                                        seed=0, start_step=0))
  assert shuffled != first(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=True,
                                                        seed=1))
  assert sorted(sum(shuffled, [])) == list(range(12))  # an epoch: no batch replayed
  # Training (shuffled) runs on past an epoch; evaluation ends with it, its
  # last batch padded with zero-weight rows.
  assert len(first(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=True), 5)) == 5
  ten = list(pipeline.distributed_dataset(strategy, {"x": np.arange(10)}, 4, shuffle=False))
  assert len(ten) == 3
  assert ten[-1][pipeline.WEIGHTS].numpy().tolist() == [1.0, 1.0, 0.0, 0.0]
  context = tf.distribute.InputContext()
  assert first(pipeline.input_fn(arrays, 4, shuffle=False)(context)) == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
  assert first(pipeline.input_fn(arrays, 4, shuffle=True)(context)) == shuffled
  # Training rows weigh 1 and are no replay; with 3 replays each batch comes
  # 3 times in a row, numbered 0, 1, 2. The augmentation's seed is (run seed,
  # the global position of the batch's first row): a function of the step.
  batches = list(zip(iter(pipeline.distributed_dataset(
      strategy, arrays, 4, shuffle=True, seed=7, repeats_per_batch=3,
      augment_fn=lambda b, s: {**b, "seed": tf.broadcast_to(s, [4, 2])})), range(6)))
  rows = [b["x"].numpy().tolist() for b, _ in batches]
  assert rows[0] == rows[1] == rows[2] != rows[3] == rows[4] == rows[5]
  assert [b[pipeline.REPLAY_INDEX].numpy().tolist() for b, _ in batches] == [
      [r] * 4 for r in (0, 1, 2, 0, 1, 2)]
  assert all(b[pipeline.WEIGHTS].numpy().tolist() == [1.0] * 4 for b, _ in batches)
  assert [b["seed"].numpy()[0].tolist() for b, _ in batches] == [
      [7, 0], [7, 0], [7, 0], [7, 4], [7, 4], [7, 4]]
  plain = next(iter(pipeline.distributed_dataset(strategy, arrays, 4, shuffle=True)))
  assert plain[pipeline.REPLAY_INDEX].numpy().tolist() == [0] * 4
  # Training batches take the augmentation, evaluation batches the eval
  # transform (ImageNet's random crop vs centre crop); never the other.
  mark = lambda key: lambda b, *seed: {**b, key: b["x"] * 0 + 1}
  for shuffle, key in ((True, "augmented"), (False, "evaluated")):
    batch = next(iter(pipeline.distributed_dataset(
        strategy, arrays, 4, shuffle=shuffle, augment_fn=mark("augmented"),
        eval_fn=mark("evaluated"))))
    assert [k for k in ("augmented", "evaluated") if k in batch] == [key]
  # Every batch has its static size: XLA and TPUs compile one shape.
  for shuffle in (True, False):
    spec = pipeline.input_fn({"x": np.arange(10)}, 4, shuffle=shuffle)(context).element_spec
    assert spec["x"].shape.as_list() == [4]
