"""The core loop on real TNEWS data: learning, resume, distribution, XLA, summaries."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import builders


@pytest.mark.slow
def test_loss_falls_and_dev_accuracy_beats_chance(fewclue_dir, tmp_path):
  # A from-scratch BERT sits on a plateau for ~100 steps before it learns.
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=300, global_batch_size=32,
                                    steps_per_loop=50, checkpoint_every=300) + [
      "bert_classifier.hidden_dim = 64", "bert_classifier.dropout = 0.0",
      "adamw.learning_rate = 1e-3"]
  results = builders.run("train_and_evaluate", tmp_path, tf.distribute.get_strategy(),
                        bindings)
  losses = [float(line.split("| loss ")[1].split()[0]) for line in results["lines"]
            if line.startswith("step ")]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 0.5, losses  # ln(15) = 2.71 at the start
  # 15 classes: chance is 1/15 = 6.7%; twice that is well clear of it.
  assert results["eval"]["accuracy"] > 0.134, results["eval"]
  for name in ("labels.json", "vocab.txt", "operative_config.gin", "checkpoint"):
    assert os.path.exists(tmp_path / name), name


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(fewclue_dir, tmp_path):
  strategy = tf.distribute.get_strategy()
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=40, steps_per_loop=10,
                                    checkpoint_every=20)
  whole = builders.run("train", tmp_path / "whole", strategy, bindings)
  expected = builders.weights(whole["experiment"].model)
  expected_optimizer = [v.numpy() for v in whole["experiment"].optimizer.variables]

  def die_at_step_30(line):
    # Steps 21..30 ran after the step-20 checkpoint and are lost, as in a crash.
    if line.startswith("step 30/"):
      raise _Killed()

  builders.configure(bindings)
  from tfadv import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(_Killed):
    experiment_lib.run("train", str(tmp_path / "resumed"), strategy, print_fn=die_at_step_30)
  assert tf.train.latest_checkpoint(str(tmp_path / "resumed")).endswith("ckpt-20")

  resumed = builders.run("train", tmp_path / "resumed", strategy, bindings)
  assert any("Restored" in line and "step 20" in line for line in resumed["lines"])
  assert int(resumed["experiment"].trainer.global_step.numpy()) == 40
  for a, b in zip(expected, builders.weights(resumed["experiment"].model)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(expected_optimizer, resumed["experiment"].optimizer.variables):
    np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.slow
def test_two_replicas_match_one_device(fewclue_dir, tmp_path, mirrored):
  # Dropout draws different masks per replica than on one device, so the
  # equality is checked with dropout off; everything else is the same math.
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=8, steps_per_loop=4,
                                    checkpoint_every=8) + [
      "bert_classifier.dropout = 0.0", "bert_classifier.classifier_dropout = 0.0"]
  one = builders.run("train", tmp_path / "one", tf.distribute.get_strategy(), bindings)
  two = builders.run("train", tmp_path / "two", mirrored, bindings)
  assert two["experiment"].trainer.strategy.num_replicas_in_sync == 2
  worst = 0.0
  for a, b in zip(builders.weights(one["experiment"].model),
                  builders.weights(two["experiment"].model)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    worst = max(worst, float(np.max(np.abs(a - b))))
  # Same global batches, summed in a different order: float32 round-off only.
  assert worst < 1e-5
  np.testing.assert_allclose(one["train"]["loss"], two["train"]["loss"], rtol=1e-5)


@pytest.mark.slow
def test_train_step_compiles_with_xla(fewclue_dir, tmp_path):
  strategy = tf.distribute.get_strategy()
  runs = {}
  for jit in (False, True):
    # XLA draws other dropout masks than the kernels do: compare without it.
    bindings = builders.tnews_bindings(fewclue_dir, train_steps=3, steps_per_loop=3,
                                      checkpoint_every=3, jit_compile=jit) + [
        "bert_classifier.dropout = 0.0", "bert_classifier.classifier_dropout = 0.0"]
    runs[jit] = builders.run("train", tmp_path / str(jit), strategy, bindings)
  trainer = runs[True]["experiment"].trainer
  assert trainer.jit_compile
  batch = next(iter(runs[True]["experiment"]._train_iterator(0)))
  hlo = trainer._replica_train.experimental_get_compiler_ir(batch)(stage="hlo")
  assert "HloModule" in hlo
  for a, b in zip(builders.weights(runs[False]["experiment"].model),
                  builders.weights(runs[True]["experiment"].model)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_tensorboard_reads_expected_tags(fewclue_dir, tmp_path):
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=10, steps_per_loop=5,
                                    checkpoint_every=10)
  builders.run("train_and_evaluate", tmp_path, tf.distribute.get_strategy(), bindings)
  tags = {}
  for name in ("train", "eval"):
    files = glob.glob(str(tmp_path / name / "events.out.tfevents.*"))
    assert files, name
    acc = event_accumulator.EventAccumulator(str(tmp_path / name),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    tags[name] = set(acc.Tags()["tensors"])
  assert {"loss", "accuracy", "learning_rate", "grad_norm",
          "examples_per_sec", "gin/operative_config"} <= tags["train"]
  assert {"loss", "accuracy"} <= tags["eval"]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
  acc.Reload()
  steps = [e.step for e in acc.Tensors("loss")]
  assert steps == [5, 10]
