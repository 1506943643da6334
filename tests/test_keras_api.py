"""`tfadv.keras.adversarial`: model.fit with the custom loop's methods."""

import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import tfadv.keras
from builders import batch_arrays, split as text_split, tiny_bert
from builders import image_arrays, image_split, tiny_cnn
from tfadv.data.clue import ClueDataset
from tfadv.data.pipeline import distributed_dataset
from tfadv.data.vocab import build_char_vocabulary
from tfadv.optimization import adamw
from tfadv.methods import (EmbeddingFGM, EmbeddingGradientPenalty, EmbeddingOutputFGM,
                           EmbeddingOutputPGD, FreeLB, FreeTraining, PGDTraining, R3F)
from tfadv.experiment import build_trainer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def trainer_weights(model, method, arrays, split, steps=1, replays=1, input_shape=None):
  trainer = build_trainer(lambda: model, method, global_batch_size=len(arrays["label"]),
                          optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                          split_batch=split, input_shape=input_shape)
  ds = distributed_dataset(trainer.strategy, arrays, len(arrays["label"]), shuffle=False,
                           num_steps=steps, repeats_per_batch=replays)
  trainer.train(iter(ds), steps)
  return [v.numpy() for v in model.trainable_variables]


def fit_weights(model, method, x, y, batch_size=None, epochs=1, sequence_length=None):
  model = tfadv.keras.adversarial(model, method, batch_size=batch_size,
                                  sequence_length=sequence_length)
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
  model.fit(x, y, batch_size=len(y), epochs=epochs, shuffle=False, verbose=0)
  return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("method_fn", [
    lambda: EmbeddingFGM(epsilon=0.5),
    lambda: EmbeddingFGM(epsilon=0.5, form="clean_plus_adversarial"),
    lambda: EmbeddingGradientPenalty(epsilon=0.5),
    lambda: EmbeddingOutputFGM(epsilon=0.5),
    lambda: EmbeddingOutputPGD(epsilon=0.5, num_steps=2, random_start=False),
    lambda: FreeLB(epsilon=0.5, step_size=0.3, ascent_steps=2),
    lambda: R3F(epsilon=0.5, r3f_lambda=2.0),
], ids=["fgm", "fgm_clean_plus_adv", "gp", "output_fgm", "output_pgd", "freelb", "r3f"])
@pytest.mark.slow
def test_one_fit_step_equals_one_trainer_step_on_bert(method_fn):
  arrays = batch_arrays()
  inputs, labels = text_split(arrays)
  shape = labels.shape + inputs["token_ids"].shape[1:]
  want = trainer_weights(tiny_bert(), method_fn(), arrays, text_split, input_shape=shape)
  got = fit_weights(tiny_bert(), method_fn(), inputs, labels, batch_size=shape[0],
                    sequence_length=shape[1])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fit_with_pgd_and_free_equals_the_trainer():
  arrays = image_arrays(8)
  x, y = image_split(arrays)
  pgd = lambda: PGDTraining(epsilon=0.1, step_size=0.03, num_steps=3, random_start=False)
  want = trainer_weights(tiny_cnn(), pgd(), arrays, image_split)
  for a, b in zip(fit_weights(tiny_cnn(), pgd(), x, y), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # One fit step of Free-3 = 3 replays of the batch in the custom loop.
  want = trainer_weights(tiny_cnn(), FreeTraining(epsilon=0.1, replays=3), arrays,
                         image_split, steps=3, replays=3, input_shape=(8, 12, 12, 1))
  got = fit_weights(tiny_cnn(), FreeTraining(epsilon=0.1, replays=3), x, y, batch_size=8)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_free_needs_a_batch_size_and_full_batches():
  with pytest.raises(ValueError, match="batch_size"):
    tfadv.keras.adversarial(tiny_cnn(), FreeTraining(epsilon=0.1))
  x, y = image_split(image_arrays(12))
  model = tfadv.keras.adversarial(tiny_cnn(), FreeTraining(epsilon=0.1, replays=2), batch_size=8)
  model.compile(optimizer="sgd", loss=LOSS)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="drop_remainder|not compatible with expected shape"):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 12 = 8 + a batch of 4


@pytest.mark.slow
def test_fit_under_mirrored_strategy_equals_one_device(mirrored):
  arrays = batch_arrays(8)
  # Keras's fit distributes numpy inputs with an AddN that refuses bool, so
  # the padding mask goes in as int32 (keras-hub's BERT accepts either).
  arrays["padding_mask"] = arrays["padding_mask"].astype(np.int32)
  inputs, labels = text_split(arrays)
  want = fit_weights(tiny_bert(), EmbeddingFGM(epsilon=0.5), inputs, labels)
  with mirrored.scope():
    model = tiny_bert()
    got = fit_weights(model, EmbeddingFGM(epsilon=0.5), inputs, labels)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fit_on_tnews_with_callbacks_then_reload_without_tfadv(tmp_path, fewclue_dir):
  data = ClueDataset(data_dir=os.path.join(fewclue_dir, "tnews"))
  names = data.label_names()
  texts, raw = data.examples("train")
  dev_texts, dev_raw = data.examples("eval")
  index = {n: i for i, n in enumerate(names)}
  vocabulary = build_char_vocabulary(texts, 3000, 2)
  preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
      keras_hub.models.BertTokenizer(vocabulary=vocabulary), sequence_length=32)
  keras.utils.set_random_seed(0)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=64,
      intermediate_dim=128, dropout=0.0, max_sequence_length=32)
  classifier = keras_hub.models.BertTextClassifier(
      backbone, num_classes=len(names), preprocessor=preprocessor, dropout=0.0)
  classifier = tfadv.keras.adversarial(classifier, EmbeddingFGM(epsilon=0.01))
  # keras-hub's fit turns lists into a dataset without shuffling, and the
  # FewCLUE file is sorted by label: give fit a dataset that reshuffles.
  train = (tf.data.Dataset.from_tensor_slices((list(texts), [index[r] for r in raw]))
           .shuffle(len(texts), seed=0, reshuffle_each_iteration=True).batch(32))
  classifier.compile(optimizer=adamw(total_steps=8 * 38, learning_rate=1e-3), loss=LOSS,
                     metrics=["accuracy"])
  history = classifier.fit(
      train, epochs=8,
      validation_data=(list(dev_texts), np.array([index[r] for r in dev_raw])),
      callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"),
                                                 monitor="val_accuracy", save_best_only=True)],
      verbose=0)
  dev_accuracy = max(history.history["val_accuracy"])
  print(f"TNEWS dev accuracy after fit with FGM: {dev_accuracy:.4f} (chance {1 / len(names):.4f})")
  # Chance is 1/15 = 6.7% (± 0.75% over 1,098 dev records): 10% is far above it.
  assert dev_accuracy > 0.10
  assert os.listdir(tmp_path / "tb" / "train") and os.listdir(tmp_path / "tb" / "validation")
  code = ("import sys, keras, keras_hub\n"
          f"m = keras.saving.load_model({str(tmp_path / 'best.keras')!r})\n"
          "print(type(m).__name__, m.predict(['国足 比赛 今晚'], verbose=0).shape)\n"
          "assert not any(k.startswith('tfadv') for k in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"BertTextClassifier (1, {len(names)})" in proc.stdout
