"""Masked-LM pretraining: keras-hub preset out, fine-tuning from it by one binding."""

import json
import os

import keras_hub
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from builders import configure, run, tnews_bindings
from tfadv import experiment as experiment_lib
from tfadv.tasks.masked_lm import PretrainingCorpus, pack
import tensorflow as tf


def pretrain_bindings(fewclue_dir, **experiment):
  lines = [
      "Experiment.task = @MaskedLMTask()",
      "MaskedLMTask.corpus = @PretrainingCorpus()",
      f"PretrainingCorpus.data_dir = '{fewclue_dir}'",
      "PretrainingCorpus.unlabeled_files = ('tnews/unlabeled.json',)",
      "PretrainingCorpus.train_files = ('tnews/train.json',)",
      "PretrainingCorpus.num_eval = 300",
      "MaskedLMTask.sequence_length = 32",
      "MaskedLMTask.masks_per_sentence = 1",
      "MaskedLMTask.pack_characters = 24",
      "MaskedLMTask.vocabulary_size = 3000",
      "bert_masked_lm.num_layers = 1",
      "bert_masked_lm.hidden_dim = 32",
      "bert_masked_lm.intermediate_dim = 64",
      "adamw.learning_rate = 3e-3",
  ]
  defaults = dict(train_steps=40, global_batch_size=32, steps_per_loop=20,
                  checkpoint_every=20, seed=0)
  defaults.update(experiment)
  return lines + [f"Experiment.{k} = {v!r}" for k, v in defaults.items()]


def test_corpus_holds_out_eval_and_refuses_dev_files(fewclue_dir):
  corpus = PretrainingCorpus(fewclue_dir, unlabeled_files=("tnews/unlabeled.json",),
                             train_files=("tnews/train.json",), num_eval=300)
  train, held_out = corpus.examples("train")[0], corpus.examples("eval")[0]
  assert len(held_out) == 300 and len(train) == 20000 - 300 + 1185
  assert not set(held_out) & set(train[:20000 - 300])
  with pytest.raises(ValueError, match="dev.json"):
    PretrainingCorpus(fewclue_dir, train_files=("tnews/dev.json",))
  assert pack(["今天", "天气", "很好"], characters=4) == ["今天 天气", "很好"]


@pytest.mark.slow
def test_pretraining_writes_a_preset_that_fine_tuning_loads(fewclue_dir, tmp_path):
  model_dir = tmp_path / "mlm"
  results = run("train_and_evaluate", model_dir, tf.distribute.get_strategy(),
                pretrain_bindings(fewclue_dir))
  lines = "\n".join(results["lines"])
  assert "masked_accuracy" in lines
  first = results["lines"][1]
  assert first.startswith("step 20/40") and "masked_accuracy" in first
  # The loss falls below ln(V) (uniform guessing) and masked tokens are
  # predicted far above chance (1/V).
  vocabulary = results["experiment"].task.preprocessor.tokenizer.vocabulary_size()
  assert results["train"]["loss"] < np.log(vocabulary) - 0.5
  # 10x chance. This was an absolute 0.03, but this 1-layer, 32-wide model levels
  # off near the unigram level in 40 steps (0.031 now, deterministic: the masks
  # no longer depend on the process's TensorFlow op-seed counter, see
  # test_masks_depend_on_the_seed_alone). A model and budget that clearly learn
  # above unigram frequency within a test's time are still to be found.
  assert results["eval"]["masked_accuracy"] > 10.0 / vocabulary
  record = json.loads((model_dir / "eval_results.json").read_text())
  assert record["masked_accuracy"] == pytest.approx(results["eval"]["masked_accuracy"])

  preset = model_dir / "preset"
  for name in ("config.json", "model.weights.h5", "tokenizer.json", "metadata.json",
               "assets/tokenizer/vocabulary.txt"):
    assert (preset / name).exists(), name
  trained = results["experiment"].model.backbone
  loaded = keras_hub.models.BertBackbone.from_preset(str(preset))
  for a, b in zip(trained.weights, loaded.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  events = event_accumulator.EventAccumulator(str(model_dir / "train"), size_guidance={
      event_accumulator.TENSORS: 0})
  events.Reload()
  assert {"loss", "masked_accuracy"} <= set(events.Tags()["tensors"])

  # Fine-tuning from it: one binding replaces vocabulary and initialisation.
  configure(tnews_bindings(fewclue_dir, train_steps=10) +
            [f"TextClassificationTask.preset = '{preset}'",
             "TextClassificationTask.sequence_length = 32"])
  experiment = experiment_lib.Experiment()  # pylint: disable=no-value-for-parameter
  experiment.build(str(tmp_path / "tnews"), tf.distribute.get_strategy(), print_fn=lambda _: None)
  backbone = experiment.model.backbone
  assert backbone.token_embedding.embeddings.shape == trained.token_embedding.embeddings.shape
  for a, b in zip(trained.weights, backbone.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert experiment.task.preprocessor.tokenizer.get_vocabulary() == \
      results["experiment"].task.preprocessor.tokenizer.get_vocabulary()
  experiment.controller.close()


@pytest.mark.slow
def test_pretraining_resumes_on_the_same_masked_examples(fewclue_dir, tmp_path):
  model_dir = tmp_path / "mlm"
  first = run("train", model_dir, tf.distribute.get_strategy(),
              pretrain_bindings(fewclue_dir, train_steps=20))
  masked = dict(first["experiment"].task.arrays("train"))
  assert os.path.exists(model_dir / "mlm_data" / "train.npz")
  again = run("train", model_dir, tf.distribute.get_strategy(),
              pretrain_bindings(fewclue_dir, train_steps=40))
  assert "Training from step 20 to 40." in again["lines"]
  for key, value in again["experiment"].task.arrays("train").items():
    np.testing.assert_array_equal(value, masked[key])
  # keras-hub's masking: 15% selected, at most 20 per sequence, labels are
  # the original tokens at the selected positions.
  weights = masked["mask_weights"]
  assert 0.10 < weights.sum() / masked["padding_mask"].sum() < 0.20


@pytest.mark.slow
def test_masks_depend_on_the_seed_alone(fewclue_dir, tmp_path):
  # keras-hub's masker took its TensorFlow op seeds from the process's op
  # counter, so the same seed gave other masks after other work in the same
  # process (the full suite's varying accuracy). The masks are drawn by numpy
  # from the seed now.
  configure(pretrain_bindings(fewclue_dir))
  task = experiment_lib.Experiment().task  # pylint: disable=no-value-for-parameter
  task.prepare(str(tmp_path))
  texts = task.corpus.examples("eval")[0][:200]
  first = task._mask(texts, 2, seed=7)  # pylint: disable=protected-access
  tf.random.uniform([5])
  tf.random.set_seed(123)
  again = task._mask(texts, 2, seed=7)  # pylint: disable=protected-access
  for key in first:
    np.testing.assert_array_equal(first[key], again[key], err_msg=key)
  other = task._mask(texts, 2, seed=8)  # pylint: disable=protected-access
  assert not np.array_equal(first["mask_positions"], other["mask_positions"])
  # BERT's rule: about 15% of the real tokens selected, [MASK] for ~80% of them.
  weights = first["mask_weights"]
  real = first["padding_mask"].sum() - 2 * len(weights)  # [CLS] and [SEP] are never selected
  assert 0.10 < weights.sum() / real < 0.20
  selected = np.take_along_axis(first["token_ids"], first["mask_positions"], 1)[weights > 0]
  mask_id = task.preprocessor.tokenizer.mask_token_id
  assert 0.7 < np.mean(selected == mask_id) < 0.9


@pytest.mark.slow
def test_pretraining_learns_above_unigram_frequency(tmp_path):
  # A corpus where context decides every token: 12-character runs of a
  # 20-character cycle, each from a random start. Predicting the most frequent
  # token (the unigram predictor) gets about 1/20 of the masked tokens; a
  # model that reads the neighbours gets more. 300 steps of a 2-layer, 64-wide
  # model reach 0.229 held-out masked accuracy here against the unigram
  # predictor's 0.067 (deterministic: same data, masks and seeds; 10 runs alone
  # gave the same), so the bound 0.15 leaves a margin on both sides.
  rng = np.random.RandomState(0)
  cycle = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉"
  runs = ["".join(cycle[(s + k) % 20] for k in range(12)) for s in rng.randint(0, 20, 3050)]
  (tmp_path / "data" / "tnews").mkdir(parents=True)
  with open(tmp_path / "data" / "tnews" / "unlabeled.json", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"sentence": r}, ensure_ascii=False) + "\n" for r in runs[:3000])
  with open(tmp_path / "data" / "tnews" / "train.json", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"sentence": r, "label": "100", "label_desc": "x"},
                            ensure_ascii=False) + "\n" for r in runs[3000:])
  results = run("train_and_evaluate", tmp_path / "mlm", tf.distribute.get_strategy(),
                pretrain_bindings(str(tmp_path / "data"), train_steps=300) + [
                    "bert_masked_lm.num_layers = 2", "bert_masked_lm.num_heads = 2",
                    "bert_masked_lm.hidden_dim = 64", "bert_masked_lm.intermediate_dim = 128"])
  held_out = results["experiment"].task.arrays("eval")
  targets = held_out["mask_ids"][held_out["mask_weights"] > 0]
  unigram = np.bincount(targets).max() / len(targets)
  assert unigram < 0.08  # 0.067 here
  accuracy = results["eval"]["masked_accuracy"]
  assert accuracy > 0.15 and accuracy > 2 * unigram, (accuracy, unigram)
