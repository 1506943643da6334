"""CLUE reader, malformed-record policies, vocabulary and input pipeline."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfadv.data import clue, pipeline, vocab
from tfadv.data.reviews import ProductReviews


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
