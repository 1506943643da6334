"""mixed_float16: loss scaling in every method's backward passes, in fit and in the custom loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import tfadv.keras
from builders import B, batch_arrays, split, tiny_bert
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods import EmbeddingFGM, EmbeddingOutputPGD, Plain
from tfadv.experiment import build_trainer

METHODS = {
    "plain": Plain,
    "fgm": lambda: EmbeddingFGM(epsilon=0.5),
    "output_pgd": lambda: EmbeddingOutputPGD(epsilon=0.5, num_steps=2, random_start=False),
}
LR = 0.5


@pytest.fixture
def start():
  """The float32 initial weights every model of a test starts from."""
  keras.mixed_precision.set_global_policy("float32")
  weights = [v.numpy() for v in tiny_bert().trainable_variables]
  yield weights
  keras.mixed_precision.set_global_policy("float32")


def _model(policy, weights):
  keras.mixed_precision.set_global_policy(policy)
  model = tiny_bert()
  for v, w in zip(model.trainable_variables, weights):
    v.assign(w)
  return model


def _optimizer(policy):
  optimizer = keras.optimizers.SGD(LR)
  return keras.optimizers.LossScaleOptimizer(optimizer) if policy == "mixed_float16" else optimizer


def trainer_update(policy, method, weights, strategy=None, n=B):
  strategy = strategy or tf.distribute.get_strategy()
  arrays = batch_arrays(n)
  trainer = build_trainer(
      lambda: _model(policy, weights), method, global_batch_size=n, strategy=strategy,
      optimizer_fn=lambda: _optimizer(policy), split_batch=split,
      input_shape=(n // strategy.num_replicas_in_sync, arrays["token_ids"].shape[1]))
  model, optimizer = trainer.model, trainer.optimizer
  metrics = trainer.train(iter(distributed_dataset(strategy, arrays, n, shuffle=False)), 1)
  return [v.numpy() - w for v, w in zip(model.trainable_variables, weights)], metrics, optimizer


def fit_update(policy, method, weights):
  model = tfadv.keras.adversarial(_model(policy, weights), method)
  model.compile(optimizer=keras.optimizers.SGD(LR),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  inputs, labels = split(batch_arrays())
  model.fit(inputs, labels, batch_size=B, epochs=1, shuffle=False, verbose=0)
  if policy == "mixed_float16":  # Keras wrapped it, as for any fit user
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  return [v.numpy() - w for v, w in zip(model.trainable_variables, weights)]


def assert_same_update(got, want, tolerance):
  """Every variable's update agrees to `tolerance` of its size (float16 compute)."""
  moved = 0
  for g, w in zip(got, want):
    size = np.linalg.norm(w)
    if size > 1e-6:
      moved += 1
      assert np.linalg.norm(g - w) <= tolerance * size, (np.linalg.norm(g), size)
  assert moved > 5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_float16_step_equals_the_float32_step(name, start):
  want, metrics32, _ = trainer_update("float32", METHODS[name](), start)
  got, metrics16, optimizer = trainer_update("mixed_float16", METHODS[name](), start)
  assert_same_update(got, want, 0.03)
  # Reported numbers are unscaled.
  assert metrics16["loss"] == pytest.approx(metrics32["loss"], rel=1e-2)
  assert metrics16["grad_norm"] == pytest.approx(metrics32["grad_norm"], rel=3e-2)
  assert float(optimizer.dynamic_scale) == 2.0 ** 15  # finite: kept (and one step counted)
  got_fit = fit_update("mixed_float16", METHODS[name](), start)
  assert_same_update(got_fit, want, 0.03)


@pytest.mark.slow
def test_float16_on_two_replicas_equals_one_device_and_reduces_once(start, mirrored):
  one, _, _ = trainer_update("mixed_float16", EmbeddingFGM(epsilon=0.5), start, n=8)
  two, _, optimizer = trainer_update("mixed_float16", EmbeddingFGM(epsilon=0.5), start,
                                     strategy=mirrored, n=8)
  # A second all-reduce inside the inner optimizer would double every update.
  assert_same_update(two, one, 1e-2)  # float16 sums in another order; 2x would be 100%
  assert optimizer.inner_optimizer._all_reduce_sum_gradients is list  # pylint: disable=protected-access


@pytest.mark.slow
def test_float16_overflow_skips_the_step_and_halves_the_scale(start):
  arrays = batch_arrays()
  trainer = build_trainer(
      lambda: _model("mixed_float16", start), EmbeddingFGM(epsilon=0.5), global_batch_size=B,
      optimizer_fn=lambda: keras.optimizers.LossScaleOptimizer(
          keras.optimizers.SGD(LR), initial_scale=1e30), split_batch=split)
  model, optimizer = trainer.model, trainer.optimizer
  trainer.train(iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=False)), 1)
  for v, w in zip(model.trainable_variables, start):
    np.testing.assert_array_equal(v.numpy(), w)  # skipped
  assert float(optimizer.dynamic_scale) == pytest.approx(5e29)


@pytest.mark.slow
def test_experiment_trains_in_mixed_float16(fewclue_dir, tmp_path):
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=10, mixed_precision="mixed_float16")
  try:
    results = builders.run("train", tmp_path, tf.distribute.get_strategy(), bindings)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  experiment = results["experiment"]
  assert isinstance(experiment.optimizer, keras.optimizers.LossScaleOptimizer)
  assert np.isfinite(results["train"]["loss"]) and results["train"]["loss"] < 3.0
