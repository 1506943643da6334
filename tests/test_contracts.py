"""The written contracts: Task, datasets, validation split and best checkpoint, errors, compat."""

import json
import os
import shutil
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from tfadv import compat, distribute
from tfadv.data.base import carve_validation
from tfadv.data.clue import ClueDataset
from tfadv.experiment import Experiment
from tfadv.tasks import Task

# --- validation split ------------------------------------------------------------


def test_carve_validation_is_stratified_seeded_and_disjoint():
  labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 3 + ["d"]
  train, validation = carve_validation(labels, 0.2, seed=4)
  assert sorted(np.concatenate([train, validation]).tolist()) == list(range(len(labels)))
  assert not set(train) & set(validation)
  picked = [labels[i] for i in validation]
  assert picked.count("a") == 4 and picked.count("b") == 2 and picked.count("c") == 1
  assert "d" not in picked  # a single example stays in train
  again, _ = carve_validation(labels, 0.2, seed=4)
  other, _ = carve_validation(labels, 0.2, seed=5)
  assert np.array_equal(train, again) and not np.array_equal(train, other)
  with pytest.raises(ValueError, match="validation_fraction"):
    carve_validation(labels, 1.0)


def test_clue_validation_split_is_carved_from_train_only(fewclue_dir):
  whole = ClueDataset(os.path.join(fewclue_dir, "tnews"))
  carved = ClueDataset(os.path.join(fewclue_dir, "tnews"), validation_fraction=0.15)
  texts, labels = whole.examples("train")
  train, validation = carved.examples("train"), carved.examples("validation")
  assert len(train[0]) + len(validation[0]) == len(texts)
  assert sorted(train[0] + validation[0]) == sorted(texts)
  assert 0.13 < len(validation[0]) / len(texts) < 0.17
  assert set(validation[1]) == set(labels)  # every label of TNEWS is validated
  assert carved.examples("eval") == whole.examples("eval")  # dev untouched
  assert carved.splits == ("train", "validation", "eval")
  with pytest.raises(ValueError, match="validation_fraction"):
    whole.examples("validation")


@pytest.mark.slow
def test_checkpoint_is_chosen_on_validation_and_dev_is_evaluated_once_on_it(
    fewclue_dir, tmp_path):
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=60, eval_every=10)
  bindings += ["ClueDataset.validation_fraction = 0.2", "adamw.learning_rate = 3e-3"]
  results = builders.run("train_and_evaluate", tmp_path, tf.distribute.get_strategy(),
                         bindings)
  validations = [line for line in results["lines"] if line.startswith("validation at step")]
  assert len(validations) == 6  # every 10 steps, the last at step 60
  accuracy = [float(line.split("| accuracy ")[1].split()[0]) for line in validations]
  steps = [int(line.split()[3]) for line in validations]
  best_step = steps[int(np.argmax(accuracy))]  # the earliest of the best
  # Dev was evaluated once, after training, on the best checkpoint.
  assert sum(line.startswith("eval at step") for line in results["lines"]) == 1
  assert results["best"]["step"] == best_step
  record = json.load(open(tmp_path / "eval_results.json"))
  assert record["step"] == best_step and record["best"]["step"] == best_step
  assert record["best"]["metrics"]["accuracy"] == pytest.approx(max(accuracy), abs=1e-4)
  with open(tmp_path / "best" / "best.json") as f:
    assert json.load(f)["step"] == best_step
  # The evaluated weights are the best checkpoint's.
  experiment = results["experiment"]
  reader = tf.train.load_checkpoint(str(tmp_path / "best"))
  assert int(reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == best_step
  assert int(experiment.trainer.global_step.numpy()) == best_step
  # Recomputed outside the experiment: the best checkpoint's recorded
  # validation accuracy is its accuracy on the validation split carved from
  # train, and the reported one its accuracy on dev (not the other way round).
  task, model = experiment.task, experiment.model

  def accuracy_on(split):
    arrays = task.arrays(split)
    inputs, labels = task.split_batch(arrays)
    logits = np.concatenate([
        model({k: v[i:i + 64] for k, v in inputs.items()}, training=False).numpy()
        for i in range(0, len(labels), 64)])
    return float(np.mean(np.argmax(logits, -1) == labels)), len(labels)

  validation, n_validation = accuracy_on("validation")
  dev, n_dev = accuracy_on("eval")
  assert n_validation != n_dev
  assert record["best"]["metrics"]["accuracy"] == pytest.approx(validation, abs=1e-6)
  assert record["accuracy"] == pytest.approx(dev, abs=1e-6)
  assert abs(validation - dev) > 1e-3  # the two splits are told apart


# --- the Task contract --------------------------------------------------------------


class Parity(Task):
  """The smallest complete task: parity of 4 bits, a linear model."""

  def prepare(self, model_dir):
    self.model_dir = model_dir

  def build_model(self):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(2)])

  def arrays(self, split):
    bits = np.random.RandomState(0 if split == "train" else 1).randint(0, 2, (64, 4))
    return {"x": bits.astype(np.float32), "y": (bits.sum(1) % 2).astype(np.int32)}

  def split_batch(self, batch):
    return batch["x"], batch["y"]

  def export(self, model, export_dir):
    return export_dir


@pytest.mark.slow
def test_a_new_task_runs_through_the_experiment_unchanged(tmp_path):
  gin.clear_config()
  experiment = Experiment(Parity(), train_steps=4, global_batch_size=8,
                          steps_per_loop=2, checkpoint_every=4)
  results = experiment.run("train_and_evaluate", str(tmp_path),
                           tf.distribute.get_strategy(), print_fn=lambda _: None)
  assert set(results["eval"]) >= {"loss", "accuracy"}
  assert json.load(open(tmp_path / "eval_results_eval.json"))["step"] == 4


def test_a_task_must_subclass_the_contract(tmp_path):
  gin.clear_config()
  class Duck:  # every member, but not a Task
    split_batch = Parity.split_batch
  with pytest.raises(TypeError, match="tfadv.tasks.Task"):
    Experiment(Duck()).run("train", str(tmp_path), tf.distribute.get_strategy())
  with pytest.raises(TypeError, match="abstract"):
    type("Half", (Task,), {"prepare": lambda self, d: None})()


# --- errors a newcomer meets: one line, exit status 2 ---------------------------------

def _main(*flags, cwd=builders.REPO):
  return subprocess.run([sys.executable, "-m", "tfadv.main", *flags], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["preset", "clue", "fashion_mnist", "bad_bytes",
                                  "unknown_label", "through_clamp"])
def test_missing_inputs_exit_2_with_one_line_naming_the_fix(case, tmp_path, fewclue_dir):
  model_dir = tmp_path / "run"
  if case in ("bad_bytes", "unknown_label"):
    # FewCLUE's TNEWS with one broken line: not UTF-8 in train, or a dev
    # label the model has no class for.
    shutil.copytree(os.path.join(fewclue_dir, "tnews"), tmp_path / "tnews")
    name, old, new = (("train.json", b'"sentence": "', b'"sentence": "\xff') if case == "bad_bytes"
                      else ("dev.json", b'"label": 115', b'"label": 999'))
    data = (tmp_path / "tnews" / name).read_bytes()
    (tmp_path / "tnews" / name).write_bytes(data.replace(old, new, 1))
    line = data[:data.index(old)].count(b"\n") + 1
    flags = ["--gin_file=configs/tnews_plain.gin", "--gin_file=configs/base/scratch.gin",
             f"--gin_param=ClueDataset.data_dir = '{tmp_path}/tnews'"]
    fix = (f"{tmp_path}/tnews/{name}:{line}: " +
           ("the line is not UTF-8" if case == "bad_bytes" else "label '999' is not among"))
  elif case == "through_clamp":  # a setting that was replaced
    flags = ["--gin_file=configs/fashion_mnist_free8.gin",
             "--gin_param=FreeTraining.through_clamp = True"]
    fix = "bind clamp_rule = 'reference'"
  elif case == "preset":
    missing = tmp_path / "runs" / "pretrain_mlm_zh" / "preset"
    flags = ["--gin_file=configs/tnews_fgm.gin",
             f"--gin_param=TextClassificationTask.preset = '{missing}'"]
    fix = "make pretrain"
  elif case == "clue":
    flags = ["--gin_file=configs/tnews_plain.gin", "--gin_file=configs/base/scratch.gin",
             f"--gin_param=ClueDataset.data_dir = '{tmp_path}/tnews'"]
    fix = "tfadv.tools.get_data clue --tasks=tnews"
  else:
    flags = ["--gin_file=configs/fashion_mnist_plain.gin",
             f"--gin_param=ImageDataset.data_dir = '{tmp_path}'"]
    fix = "apt-get install -y dataset-fashion-mnist"
  done = _main(*flags, f"--model_dir={model_dir}")
  assert done.returncode == 2, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("tfadv: ") and fix in last
  assert "Traceback" not in done.stderr
  if case != "unknown_label":  # that one needs the label map it checks against
    assert not (model_dir / "labels.json").exists()  # stopped before writing
  assert not list(model_dir.glob("ckpt-*"))  # nothing trained


# --- text evaluation under attack, HParams ----------------------------------------------

@pytest.mark.slow
def test_text_runs_report_accuracy_under_an_embedding_attack_and_hparams(fewclue_dir, tmp_path):
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=20)
  bindings += ["Experiment.method = @EmbeddingOutputFGM()",
               "EmbeddingOutputFGM.epsilon = 0.5",
               "Experiment.eval_attacks = {'pgd3': @EmbeddingOutputAttack()}",
               "EmbeddingOutputAttack.epsilon = 2.0",
               "EmbeddingOutputAttack.num_steps = 3"]
  results = builders.run("train_and_evaluate", tmp_path, tf.distribute.get_strategy(),
                         bindings)
  clean, attacked = results["eval"]["accuracy"], results["eval"]["accuracy_pgd3"]
  assert attacked < clean
  record = json.load(open(tmp_path / "eval_results.json"))
  assert record["accuracy_pgd3"] == pytest.approx(attacked)
  assert any("accuracy_pgd3" in line for line in results["lines"])
  # The run's method and ε on TensorBoard's HParams dashboard.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  content = events.PluginTagToContent("hparams")
  session = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
  values = {k: v for data in session if data.HasField("session_start_info")
            for k, v in data.session_start_info.hparams.items()}
  assert values["method"].string_value == "fgm_output"
  assert values["method.epsilon"].number_value == pytest.approx(0.5)


def test_each_method_names_itself_on_the_hparams_dashboard():
  """The name a run's HParams show (Experiment.hparams()['method']): one per
  method, written out by hand, so that a method cannot pass as another."""
  from tfadv import methods  # pylint: disable=g-import-not-at-top
  expected = {"Plain": "plain", "EmbeddingFGM": "fgm", "EmbeddingGradientPenalty": "gp",
              "EmbeddingOutputFGM": "fgm_output", "EmbeddingOutputPGD": "pgd_output",
              "FreeLB": "freelb", "FreeTraining": "free", "EmbeddingOutputFree": "free_output",
              "PGDTraining": "pgd", "FGSMTraining": "fgsm", "R3F": "r3f", "ATTATraining": "atta",
              "CharSubstitutionTraining": "char_at"}
  found = {name: getattr(methods, name).name for name in expected}
  assert found == expected
  assert methods.Method.name == "method"
  # Only ATTA keeps each image's perturbation across epochs (refused beside
  # random crops and flips); every other method trains with augmentation.
  assert [n for n in expected if getattr(methods, n).keeps_input_perturbations] == [
      "ATTATraining"]


def test_a_methods_random_draws_are_checkpointed_state_seeded_by_its_own_seed_or_the_runs():
  """The generator of a method's random starts is in `variables` once built
  (checkpointed with the model, so a resumed run draws what the straight run
  draws), none before; it is seeded by the method's own `seed` where bound,
  else by the run's."""
  from tfadv.methods import EmbeddingOutputPGD, PGDTraining  # pylint: disable=g-import-not-at-top
  for make, model in ((PGDTraining, builders.tiny_cnn()),
                      (EmbeddingOutputPGD, builders.tiny_masked_model()[0])):
    for own, run, drawn in ((None, 3, 3), (7, 3, 7)):
      method = make(seed=own)
      assert method.variables == []
      method.seed_with(run)
      method.build(model)
      generators = [v for v in method.variables if isinstance(v, tf.random.Generator)]
      assert len(generators) == 1, make
      want = tf.random.Generator.from_seed(drawn).uniform([3]).numpy()
      np.testing.assert_array_equal(generators[0].uniform([3]).numpy(), want)
  # The output FGM's random control adds its draws' step count; FGM itself does not.
  from tfadv.methods import EmbeddingOutputFGM  # pylint: disable=g-import-not-at-top
  for direction, count in (("adversarial", 0), ("random", 1)):
    method = EmbeddingOutputFGM(direction=direction)
    method.build(builders.tiny_masked_model()[0])
    kinds = [type(v).__name__ if isinstance(v, tf.random.Generator) else v.dtype.name
             for v in method.variables]
    assert sorted(kinds) == sorted(["Generator"] + ["int64"] * count), direction
  # FreeLB's buffer (carried across batches) is checkpointed with its generator.
  from tfadv.methods import FreeLB  # pylint: disable=g-import-not-at-top
  method = FreeLB(carry_over=True)
  assert method.variables == []
  method.build(builders.tiny_masked_model()[0], input_shape=(builders.B, builders.L))
  assert sorted(type(v).__name__ if isinstance(v, tf.random.Generator) else v.dtype.name
                for v in method.variables) == ["Generator", "float32"]


def test_free_buffers_and_token_memory_are_checkpointed_untrained_state_none_before_build():
  """Free's perturbation buffer (images: one replica's batch; text: batch ×
  length × hidden) and the text form's token memory (vocabulary × hidden, only
  with carry='token') are the method's `variables`, so checkpoints keep them;
  none exists before `build`, and none is trainable."""
  from tfadv.methods import EmbeddingOutputFree, FreeTraining  # pylint: disable=g-import-not-at-top
  free = FreeTraining()
  assert free.variables == []
  shape = (builders.IB, builders.IH, builders.IH, 1)
  free.build(builders.tiny_cnn(), input_shape=shape)
  assert [(tuple(v.shape), v.dtype.name, v.trainable) for v in free.variables] == [
      (shape, "float32", False)]
  for carry in ("reset", "slot", "token"):
    method = EmbeddingOutputFree(carry=carry)
    assert method.variables == [], carry
    method.build(builders.tiny_masked_model()[0], input_shape=(builders.B, builders.L))
    state = [v for v in method.variables if not isinstance(v, tf.random.Generator)]
    assert len(method.variables) == len(state) + 1, carry  # and the start's generator
    want = [((builders.B, builders.L, 3), "float32", False)]  # the buffer; hidden 3
    if carry == "token":
      want.append(((builders.V, 3), "float32", False))  # the memory
    assert [(tuple(v.shape), v.dtype.name, v.trainable) for v in state] == want, carry


def test_a_plain_step_is_one_training_pass_and_reports_no_metrics():
  from tfadv.methods import Plain  # pylint: disable=g-import-not-at-top
  model = builders.dropout_model()
  arrays = builders.batch_arrays()
  inputs, labels, weights = builders.text_inputs(arrays), arrays["label"], tf.ones([builders.B])
  fn = builders.loss_fn()
  out, _ = builders.rewound(
      model, lambda: Plain().compute_gradients(model, fn, inputs, labels, weights))
  assert out.metrics == {}
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), weights)  # dropout on
  np.testing.assert_allclose(float(out.loss), float(loss), rtol=1e-6)
  for got, want in zip(out.gradients, tape.gradient(loss, model.trainable_variables)):
    np.testing.assert_allclose(builders.dense(got), builders.dense(want), rtol=1e-6, atol=1e-8)


def test_adding_gradients_keeps_a_pass_that_left_a_variable_out():
  from tfadv.methods.base import add_gradients  # pylint: disable=g-import-not-at-top
  a, b = tf.constant([1.0, 2.0]), tf.constant([10.0, 20.0])
  assert add_gradients(None, b) is b and add_gradients(a, None) is a
  assert add_gradients(None, None) is None
  np.testing.assert_array_equal(add_gradients(a, b, 0.5).numpy(), [6.0, 12.0])
  rows = add_gradients(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([3]), tf.constant([5, 1])),
                       tf.IndexedSlices(tf.constant([[2.0]]), tf.constant([3]), tf.constant([5, 1])),
                       0.5)
  assert isinstance(rows, tf.IndexedSlices)  # sparse stays sparse
  np.testing.assert_array_equal(tf.convert_to_tensor(rows).numpy()[:, 0], [0, 0, 0, 2.0, 0])
  mixed = add_gradients(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([3]),
                                         tf.constant([5, 1])), tf.ones([5, 1]), 2.0)
  np.testing.assert_array_equal(mixed.numpy()[:, 0], [2.0, 2.0, 2.0, 3.0, 2.0])


def test_each_methods_defaults_are_the_documented_ones():
  """What a config that binds nothing gets, written out by hand: the papers'
  and reference code's settings where they have one (PGD-7 with α = ε/4,
  Madry et al.; FGSM-RS's α = 1.25ε, Wong et al.; Free's m = 8, Shafahi et
  al.; R3F's σ = 1e-5, λ = 1, uniform noise, fairseq's rxf), and for the
  rest the values the shipped configs were written against. A changed
  default changes every run that relied on it, so it must change here too."""
  from tfadv import methods  # pylint: disable=g-import-not-at-top
  text = {"layer_name": "token_embedding", "padding_mask_key": "padding_mask", "seed": 0}
  matrix = {"embedding_path": "token_embedding/embeddings", "combine": "dense"}
  image = {"clip_min": 0.0, "clip_max": 1.0}
  expected = {
      "Plain": {},
      "EmbeddingFGM": {"epsilon": 1.0, "norm": "l2", "form": "adversarial",
                       "adversarial_weight": 1.0, "direction": "adversarial", "seed": 0, **matrix},
      "EmbeddingGradientPenalty": {"epsilon": 1.0, "variant": "squared",
                                   "form": "per_occurrence", **matrix},
      "EmbeddingOutputFGM": {"epsilon": 1.0, "form": "clean_plus_adversarial",
                             "adversarial_weight": 1.0, "direction": "adversarial", **text},
      "EmbeddingOutputPGD": {"epsilon": 1.0, "step_size": 1.0 / 1.2, "num_steps": 3,
                             "random_start": True, "form": "adversarial",
                             "adversarial_weight": 1.0, **text},
      "FreeLB": {"epsilon": 1.0, "step_size": 0.3, "ascent_steps": 3, "init_magnitude": 1.0,
                 "carry_over": False, "sync_dropout": True, **text},
      "FreeTraining": {"epsilon": 0.1, "replays": 8, "clamp_rule": "project", **image},
      "EmbeddingOutputFree": {"epsilon": 1.0, "replays": 3, "step_size": 1.0, "carry": "reset",
                              "init_magnitude": 1.0, "token_ids_key": "token_ids", **text},
      "PGDTraining": {"epsilon": 0.1, "step_size": 0.025, "num_steps": 7, "norm": "linf",
                      "random_start": True, "seed": 0, **image},
      "FGSMTraining": {"epsilon": 0.1, "step_size": 0.125, "num_steps": 1, "norm": "linf",
                       "random_start": True, "seed": 0, **image},
      "R3F": {"epsilon": 1e-5, "r3f_lambda": 1.0, "noise_type": "uniform", **text},
      "ATTATraining": {"epsilon": 0.1, "step_size": 0.025, "num_steps": 1, "init_scale": 1e-3,
                       "seed": 0, **image},
      "CharSubstitutionTraining": {
          "attacked_share": 0.5, "adversarial_weight": 0.0, "inner": "Plain",
          "inner_config": {}, "attack": {
              "budget": 1, "max_fraction": 0.1, "budget_rule": "ceil", "search": "greedy",
              "beam_width": 10, "beam_examples": 4, "pinyin_candidates": 8,
              "embedding_candidates": 8, "top_k": 8, "token_ids_key": "token_ids",
              "padding_mask_key": "padding_mask", "layer_name": "token_embedding"}},
  }
  for name, config in expected.items():
    assert getattr(methods, name)().get_config() == config, name


# --- compat: every private reach works here, and fails loudly when moved -------------------

def test_compat_shims_work_with_the_installed_keras_and_tensorflow(mirrored):
  optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
  compat.skip_optimizer_all_reduce(optimizer)
  assert optimizer._all_reduce_sum_gradients is list  # pylint: disable=protected-access
  assert optimizer.inner_optimizer._all_reduce_sum_gradients is list  # pylint: disable=protected-access
  assert compat.in_multi_worker_mode(mirrored) is False
  assert distribute.is_chief(mirrored) and distribute.is_chief(tf.distribute.get_strategy())
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer="sgd", loss="mse")
  assert isinstance(compat.loss_tracker(model), keras.metrics.Mean)
  compat.replace_train_step(model, lambda self, data: {"custom": tf.constant(7.0)})
  history = model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0)
  assert history.history["custom"] == [7.0]
  layer = model.layers[0]
  with compat.swapped_call(layer, lambda x: tf.zeros([tf.shape(x)[0], 1]) + 3.0):
    assert float(model(np.ones((1, 2)))[0, 0]) == 3.0
  assert float(model(np.zeros((1, 2)))[0, 0]) == float(layer.bias[0])
  was = compat.op_determinism_enabled()
  assert isinstance(was, bool)


@pytest.mark.parametrize("shim, target, attribute", [
    ("skip_optimizer_all_reduce", "optimizer", "_all_reduce_sum_gradients"),
    ("in_multi_worker_mode", "extended", "_in_multi_worker_mode"),
    ("loss_tracker", "model", "_loss_tracker"),
])
def test_compat_fails_loudly_when_keras_moves_an_attribute(shim, target, attribute,
                                                           monkeypatch, mirrored):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer="sgd", loss="mse")
  objects = {"optimizer": (keras.optimizers.SGD(0.1), lambda o: o),
             "extended": (mirrored, lambda s: s.extended),
             "model": (model, lambda m: m)}
  argument, owner = objects[target]
  holder = owner(argument)
  if attribute in vars(holder):
    monkeypatch.delattr(holder, attribute)
  for cls in type(holder).__mro__:  # a method: gone from every class defining it
    if attribute in vars(cls):
      monkeypatch.delattr(cls, attribute)
  assert not hasattr(holder, attribute)
  with pytest.raises(compat.CompatibilityError, match="compat.py"):
    getattr(compat, shim)(argument)
