"""mixed_float16: loss scaling in every method's backward passes, in fit and in the custom loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import tfadv.keras
from builders import B, IB, IH, batch_arrays, image_arrays, image_split, split, tiny_bert
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods import (EmbeddingFGM, EmbeddingGradientPenalty, EmbeddingOutputFree,
                           EmbeddingOutputPGD, FGSMTraining, FreeLB, FreeTraining, PGDTraining,
                           Plain, R3F)
from tfadv.experiment import build_trainer

METHODS = {
    "plain": Plain,
    "fgm": lambda: EmbeddingFGM(epsilon=0.5),
    "output_pgd": lambda: EmbeddingOutputPGD(epsilon=0.5, num_steps=2, random_start=False),
    # The penalty needs the gradient's value: float16 must unscale it.
    "gp": lambda: EmbeddingGradientPenalty(epsilon=1.0),
    "gp_matrix": lambda: EmbeddingGradientPenalty(epsilon=1.0, form="matrix"),
    "freelb": lambda: FreeLB(epsilon=0.5, step_size=0.2, ascent_steps=2, carry_over=True),
    "free_output": lambda: EmbeddingOutputFree(epsilon=0.5, replays=2),
    "r3f": lambda: R3F(epsilon=0.5, r3f_lambda=2.0),
}
IMAGE_METHODS = {
    "pgd": lambda: PGDTraining(epsilon=0.1, step_size=0.03, num_steps=3),
    "fgsm_rs": lambda: FGSMTraining(epsilon=0.1),
    "free": lambda: FreeTraining(epsilon=0.1, replays=2),
}
LR = 0.5


def _float32_weights(build):
  """The float32 initial weights every model of a test starts from; the
  policy is float32 again after the test."""
  keras.mixed_precision.set_global_policy("float32")
  yield [v.numpy() for v in build().trainable_variables]
  keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def start():
  yield from _float32_weights(tiny_bert)


def _model(policy, weights, build=tiny_bert):
  keras.mixed_precision.set_global_policy(policy)
  model = build()
  for v, w in zip(model.trainable_variables, weights):
    v.assign(w)
  return model


def _optimizer(policy):
  optimizer = keras.optimizers.SGD(LR)
  return keras.optimizers.LossScaleOptimizer(optimizer) if policy == "mixed_float16" else optimizer


def trainer_update(policy, method, weights, strategy=None, n=B, steps=1, images=False):
  """The weights' change after `steps` steps on one batch (a buffer carried
  over from step to step shows in the second)."""
  strategy = strategy or tf.distribute.get_strategy()
  if images:
    arrays, batch_split, build = image_arrays(n), image_split, smooth_cnn
    shape = (n // strategy.num_replicas_in_sync, IH, IH, 1)
  else:
    arrays, batch_split, build = batch_arrays(n), split, tiny_bert
    shape = (n // strategy.num_replicas_in_sync, arrays["token_ids"].shape[1])
  trainer = build_trainer(
      lambda: _model(policy, weights, build), method, global_batch_size=n, strategy=strategy,
      optimizer_fn=lambda: _optimizer(policy), split_batch=batch_split, input_shape=shape)
  model, optimizer = trainer.model, trainer.optimizer
  dataset = distributed_dataset(strategy, arrays, n, shuffle=False, num_steps=steps,
                                repeats_per_batch=steps)
  metrics = trainer.train(iter(dataset), steps)
  return [v.numpy() - w for v, w in zip(model.trainable_variables, weights)], metrics, optimizer


def fit_update(policy, method, weights):
  inputs, labels = split(batch_arrays())
  model = tfadv.keras.adversarial(_model(policy, weights), method, batch_size=B,
                                  sequence_length=inputs["token_ids"].shape[1])
  model.compile(optimizer=keras.optimizers.SGD(LR),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(inputs, labels, batch_size=B, epochs=1, shuffle=False, verbose=0)
  if policy == "mixed_float16":  # Keras wrapped it, as for any fit user
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  return [v.numpy() - w for v, w in zip(model.trainable_variables, weights)]


def assert_same_update(got, want, tolerance, at_least=6):
  """Every variable's update agrees to `tolerance` of its size (float16 compute)."""
  moved = 0
  for g, w in zip(got, want):
    size = np.linalg.norm(w)
    if size > 1e-6:
      moved += 1
      assert np.linalg.norm(g - w) <= tolerance * size, (np.linalg.norm(g), size)
  assert moved >= at_least


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_float16_step_equals_the_float32_step(name, start):
  # Free-m: m replays of the batch (the second starts from the δ the first
  # moved), which is one `fit` step (it replays the batch itself).
  steps = METHODS[name]().batch_replays
  want, metrics32, _ = trainer_update("float32", METHODS[name](), start, steps=steps)
  got, metrics16, optimizer = trainer_update("mixed_float16", METHODS[name](), start,
                                             steps=steps)
  assert_same_update(got, want, 0.03)
  # Reported numbers are unscaled.
  assert metrics16["loss"] == pytest.approx(metrics32["loss"], rel=1e-2)
  assert metrics16["grad_norm"] == pytest.approx(metrics32["grad_norm"], rel=3e-2)
  assert float(optimizer.dynamic_scale) == 2.0 ** 15  # finite: kept (and one step counted)
  got_fit = fit_update("mixed_float16", METHODS[name](), start)
  assert_same_update(got_fit, want, 0.03)


def smooth_cnn(seed=0):
  """A small CNN without max-pooling or ReLU: in float16 those turn near-ties
  into different arg-maxes (tiny_cnn's conv updates differ by 15-25% between
  float16 and float32 for plain training), which is float16's rounding, not
  loss scaling."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((IH, IH, 1)), keras.layers.Conv2D(4, 3, strides=2, activation="tanh"),
      keras.layers.Conv2D(8, 3, strides=2, activation="tanh"), keras.layers.Flatten(),
      keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)])


@pytest.fixture
def image_start():
  yield from _float32_weights(smooth_cnn)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMAGE_METHODS))
def test_float16_image_steps_equal_the_float32_steps(name, image_start):
  # Two steps on one batch: Free's second replay starts from the δ its first moved.
  want, metrics32, _ = trainer_update("float32", IMAGE_METHODS[name](), image_start, n=IB,
                                      steps=2, images=True)
  got, metrics16, optimizer = trainer_update("mixed_float16", IMAGE_METHODS[name](),
                                             image_start, n=IB, steps=2, images=True)
  assert_same_update(got, want, 0.03, at_least=4)
  assert metrics16["loss"] == pytest.approx(metrics32["loss"], rel=1e-2)
  assert float(optimizer.dynamic_scale) == 2.0 ** 15


@pytest.mark.slow
def test_a_skipped_float16_step_leaves_free_buffers_unchanged():
  # A linear model with a small kernel and the loss scale 2^20: the kernel's
  # gradient (a sum over the batch) overflows float16, the input gradient
  # (through the small kernel) does not, so sign(∇δ) is finite. The
  # optimizer skips the step; δ must stay where it was too.
  def model_fn():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((IH, IH, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(
                                 stddev=1e-3))])
  arrays = {"image": np.full((64, IH, IH, 1), 200, np.uint8),
            "label": np.zeros(64, np.int32)}  # one class: the batch sums do not cancel
  method = FreeTraining(epsilon=0.1, replays=1)
  try:
    trainer = build_trainer(
        model_fn, method, global_batch_size=64, split_batch=image_split,
        optimizer_fn=lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(LR), initial_scale=2.0 ** 20),
        input_shape=(64, IH, IH, 1))
    model = trainer.model
    before = [v.numpy() for v in model.trainable_variables]
    # The case: the input gradient is finite, a weight gradient is not.
    x, y = image_split(arrays)
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = tf.cast(model(x), tf.float32)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True)) * 2.0 ** 20
    grad_x, *grad_w = tape.gradient(loss, [x] + model.trainable_variables)
    assert np.all(np.isfinite(grad_x.numpy())) and np.any(grad_x.numpy() != 0)
    assert not all(np.all(np.isfinite(g.numpy())) for g in grad_w)
    trainer.train(iter(distributed_dataset(trainer.strategy, arrays, 64, shuffle=False)), 1)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  for v, w in zip(model.trainable_variables, before):
    np.testing.assert_array_equal(v.numpy(), w)  # skipped
  np.testing.assert_array_equal(method.perturbation.numpy(), 0.0)  # and δ kept


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


def test_keep_if_finite_agrees_over_replicas(mirrored):
  # Replica 1's weight gradient overflows: the optimizer (which sees the sum)
  # skips the step, so both replicas keep their old buffers; their own new
  # buffers are finite. Without gradients only the replica's own buffer counts.
  from tfadv.loss_scaling import keep_if_finite  # pylint: disable=g-import-not-at-top

  def step():
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    gradient = tf.where(tf.equal(replica, 1), np.inf, 1.0) * tf.ones([3])
    new, old = tf.fill([2], 5.0), tf.fill([2], 7.0)
    sparse = tf.IndexedSlices(tf.ones([1, 3]), tf.constant([0]), tf.constant([4, 3]))
    return (keep_if_finite(new, old, [gradient, None, sparse]),
            keep_if_finite(new, old, [tf.ones([3])]),
            keep_if_finite(tf.where(tf.equal(replica, 1), np.nan, 5.0) * tf.ones([2]), old))

  skipped, kept, own = mirrored.run(tf.function(step))
  for replica in range(2):
    np.testing.assert_array_equal(mirrored.experimental_local_results(skipped)[replica], [7, 7])
    np.testing.assert_array_equal(mirrored.experimental_local_results(kept)[replica], [5, 5])
  np.testing.assert_array_equal(mirrored.experimental_local_results(own)[0], [5, 5])
  np.testing.assert_array_equal(mirrored.experimental_local_results(own)[1], [7, 7])
  # An overflow in an IndexedSlices gradient (an embedding table's) counts too.
  sparse = tf.IndexedSlices(tf.constant([[np.inf]]), tf.constant([0]), tf.constant([2, 1]))
  np.testing.assert_array_equal(keep_if_finite(tf.ones([1]), tf.zeros([1]), [sparse]), [0.0])
