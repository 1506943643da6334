"""ATTA's per-example memory and the pipeline's example indices it is keyed by."""

import os
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from builders import IB as B, IH as H, REPO, image_arrays, image_split, tiny_cnn
from builders import main_command, write_tiny_fashion_idx
from tfadv import compat
from tfadv.data.pipeline import EXAMPLE_INDEX, distributed_dataset
from tfadv.errors import SettingError
from tfadv.experiment import build_trainer
from tfadv.methods import ATTATraining

EPS, ALPHA = 0.1, 0.04


# --- the pipeline's example indices ------------------------------------------

@pytest.mark.parametrize("replicas", [1, 2])
def test_example_index_is_the_training_row_each_example_came_from(replicas, mirrored):
  strategy = mirrored if replicas == 2 else tf.distribute.get_strategy()
  n = 10
  arrays = {"row": np.arange(n, dtype=np.int32) * 7, "label": np.zeros(n, np.int32)}
  ds = distributed_dataset(strategy, arrays, 4, shuffle=True, seed=3)
  seen = []
  iterator = iter(ds)
  for _ in range(5):  # 20 positions: two epochs, batches across their boundary
    batch = next(iterator)
    for local in strategy.experimental_local_results(batch):
      np.testing.assert_array_equal(local[EXAMPLE_INDEX].numpy() * 7, local["row"].numpy())
      seen.extend(local[EXAMPLE_INDEX].numpy().tolist())
  # Each epoch is a permutation of the rows.
  assert sorted(seen[:n]) == sorted(seen[n:]) == list(range(n))


# --- a step against a hand computation --------------------------------------

def _linear(weights):
  inputs = keras.Input((2, 2, 1))
  layer = keras.layers.Dense(3)
  model = keras.Model(inputs, layer(keras.layers.Flatten()(inputs)))
  layer.set_weights([weights, np.zeros(3, np.float32)])
  return model


WEIGHTS = np.array([[1.0, -1, 0.5], [-2, 1, 0], [0.5, 0.5, -1], [1, -1, 2]], np.float32)
# Six 2×2 images with black (0) and white (1) pixels, so the box binds.
IMAGES = np.array([[[0.0, 1.0], [0.5, 0.02]], [[0.0, 0.0], [1.0, 0.97]],
                   [[0.3, 0.6], [0.0, 1.0]], [[1.0, 1.0], [0.05, 0.5]],
                   [[0.2, 0.0], [0.9, 0.4]], [[0.7, 0.1], [1.0, 0.0]]], np.float32)[..., None]
LABELS = np.array([0, 2, 1, 1, 0, 2], np.int32)


def _hand_atta(memory, weights, bias, ids, steps, lr, batch):
  """ATTA by hand: for each step's ids, δ = Π_box(M[ids]), `steps` times
  δ ← Π_box(δ + α·sign(∂CE/∂x)), then SGD on CE at x + δ, M[ids] ← δ
  (a repeated id keeps its last occurrence's δ). Linear softmax model."""
  memory, weights, bias = memory.copy(), weights.copy(), bias.copy()
  for step_ids in ids:
    x, y = IMAGES[step_ids], LABELS[step_ids]
    low, high = np.maximum(-EPS, -x), np.minimum(EPS, 1 - x)
    delta = np.clip(memory[step_ids], low, high)

    def softmax_minus_onehot(d):
      z = (x + d).reshape(len(x), -1) @ weights + bias
      p = np.exp(z - z.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(y)), y] -= 1.0
      return p

    for _ in range(steps):
      g = (softmax_minus_onehot(delta) @ weights.T).reshape(x.shape)
      delta = np.clip(delta + ALPHA * np.sign(g), low, high)
    p = softmax_minus_onehot(delta)
    flat = (x + delta).reshape(len(x), -1)
    weights = weights - lr * flat.T @ p / batch
    bias = bias - lr * p.sum(0) / batch
    for i, row in enumerate(step_ids):
      memory[row] = delta[i]
  return memory, weights


@pytest.mark.parametrize("steps", [1, 2])
def test_atta_matches_a_hand_computed_reference_over_epochs(steps):
  method = ATTATraining(epsilon=EPS, step_size=ALPHA, num_steps=steps)
  trainer = build_trainer(lambda: _linear(WEIGHTS), method, global_batch_size=4,
                          optimizer_fn=lambda: keras.optimizers.SGD(0.5),
                          split_batch=image_split_float, input_shape=(4, 2, 2, 1),
                          num_examples=len(LABELS))
  # A remembered δ partly outside this data's box (as after augmentation).
  start = np.random.RandomState(1).uniform(-0.15, 0.15, (6, 2, 2, 1)).astype(np.float32)
  method.memory.assign(start)
  arrays = {"image": IMAGES, "label": LABELS}
  ds = distributed_dataset(trainer.strategy, arrays, 4, shuffle=True, seed=2)
  ids = _take(arrays, 4)  # the rows the pipeline hands the 4 steps (tested above)
  iterator = iter(ds)
  for _ in range(4):  # 16 positions over 6 examples: some rows written twice
    trainer.train(iterator, 1)
  want_memory, want_weights = _hand_atta(start, WEIGHTS, np.zeros(3, np.float32), ids,
                                         steps, 0.5, 4)
  np.testing.assert_allclose(method.memory.numpy(), want_memory, atol=1e-6)
  np.testing.assert_allclose(trainer.model.layers[-1].kernel.numpy(), want_weights,
                             rtol=1e-5, atol=1e-6)
  memory = method.memory.numpy()
  assert np.all(IMAGES + memory >= -1e-7) and np.all(IMAGES + memory <= 1 + 1e-7)
  assert np.all(np.abs(memory) <= EPS + 1e-7)


def _take(arrays, batch):
  ds = distributed_dataset(tf.distribute.get_strategy(), arrays, batch, shuffle=True, seed=2)
  iterator = iter(ds)
  return [next(iterator)[EXAMPLE_INDEX].numpy() for _ in range(4)]


def image_split_float(batch):
  return batch["image"], batch["label"]


def test_atta_writes_exactly_the_batch_rows_and_the_last_of_a_repeated_id():
  method = ATTATraining(epsilon=EPS, step_size=ALPHA, num_steps=1)
  model = _linear(WEIGHTS)
  method.build(model, input_shape=(4, 2, 2, 1), num_examples=6)
  before = method.memory.numpy()
  ids = tf.constant([4, 1, 4, 0], tf.int32)
  images = tf.constant(IMAGES[[3, 1, 5, 0]])  # row 4 seen with two different images

  def loss_fn(labels, logits, weights):
    return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True) * weights) / 4

  method.compute_gradients(model, loss_fn, images, tf.constant(LABELS[[3, 1, 5, 0]]),
                           tf.ones([4]), example_ids=ids)
  after = method.memory.numpy()
  untouched = [2, 3, 5]
  np.testing.assert_array_equal(after[untouched], before[untouched])  # bit-identical
  for row in (0, 1, 4):
    assert not np.array_equal(after[row], before[row])
  # Row 4's two occurrences: the later one's δ (position 2: image 5, label 2) is
  # kept, not the earlier one's (image 3, label 1).
  def one_step(image_row):  # one ascent step from memory row 4 on this image, by hand
    x, y = IMAGES[image_row], LABELS[image_row]
    low, high = np.maximum(-EPS, -x), np.minimum(EPS, 1 - x)
    delta = np.clip(before[4], low, high)
    z = (x + delta).reshape(1, -1) @ WEIGHTS
    p = np.exp(z - z.max())
    p /= p.sum()
    p[0, y] -= 1.0
    g = (p @ WEIGHTS.T).reshape(x.shape)
    return np.clip(delta + ALPHA * np.sign(g), low, high)
  np.testing.assert_allclose(after[4], one_step(5), atol=1e-7)
  assert not np.allclose(one_step(5), one_step(3))


def test_an_entry_with_zero_gradient_stays_and_counts_as_stuck():
  weights = WEIGHTS.copy()
  weights[2] = 0.0  # pixel (1, 0) does not reach the logits: its gradient is 0
  model = _linear(weights)
  method = ATTATraining(epsilon=EPS, step_size=ALPHA, num_steps=1)
  method.build(model, input_shape=(2, 2, 2, 1), num_examples=6)
  before = method.memory.numpy()
  fn = lambda labels, logits, w: tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
      labels, logits, from_logits=True) * w) / 2
  out = method.compute_gradients(model, fn, tf.constant(IMAGES[[0, 2]]),
                                 tf.constant(LABELS[[0, 2]]), tf.ones([2]),
                                 example_ids=tf.constant([0, 2]))
  after = method.memory.numpy()
  for row in (0, 2):
    x = IMAGES[row]
    start = np.clip(before[row], np.maximum(-EPS, -x), np.minimum(EPS, 1 - x))
    assert after[row, 1, 0, 0] == start[1, 0, 0]  # did not move
    # The others moved, or sat at the box's edge the step pushed them against.
    moved = np.delete(after[row].ravel(), 2) != np.delete(start.ravel(), 2)
    low = np.delete(np.maximum(-EPS, -x).ravel(), 2)
    high = np.delete(np.minimum(EPS, 1 - x).ravel(), 2)
    edge = np.isclose(np.delete(after[row].ravel(), 2), low) | np.isclose(
        np.delete(after[row].ravel(), 2), high)
    assert np.all(moved | edge)
  assert float(out.metrics["stuck"]) == 0.25  # one of four pixels per image


def test_attack_and_training_passes_run_in_training_mode():
  seen = []

  class Recorder(keras.layers.Layer):
    def call(self, x, training=None):
      seen.append(training)
      return x

  inputs = keras.Input((2, 2, 1))
  model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(Recorder()(inputs))))
  seen.clear()
  method = ATTATraining(epsilon=EPS, step_size=ALPHA, num_steps=2)
  method.build(model, input_shape=(2, 2, 2, 1), num_examples=6)
  fn = lambda labels, logits, w: tf.reduce_mean(logits) * 0 + tf.reduce_sum(logits[:, 0])
  method.compute_gradients(model, fn, tf.constant(IMAGES[:2]), tf.constant(LABELS[:2]),
                           tf.ones([2]), example_ids=tf.constant([0, 1]))
  # Two attack passes and the training pass, all in training mode (as
  # PGDTraining's attack: dropout drawn, batch statistics used).
  assert seen == [True, True, True]


# --- distribution, XLA, resume --------------------------------------------------

def _atta_trainer(strategy, jit=False, n=3 * B):
  method = ATTATraining(epsilon=EPS, step_size=0.03, num_steps=2)
  trainer = build_trainer(lambda: tiny_cnn(0), method, global_batch_size=B,
                          strategy=strategy, optimizer_fn=lambda: keras.optimizers.SGD(0.05),
                          split_batch=image_split, jit_compile=jit, num_examples=n,
                          input_shape=(B // strategy.num_replicas_in_sync, H, H, 1))
  return trainer, method


def _run(trainer, steps, n=3 * B):
  ds = distributed_dataset(trainer.strategy, image_arrays(n), B, shuffle=True, seed=5)
  trainer.train(iter(ds), steps)


@pytest.mark.slow
def test_atta_on_two_replicas_equals_one_device(mirrored):
  results = []
  for strategy in (tf.distribute.get_strategy(), mirrored):
    trainer, method = _atta_trainer(strategy)
    initial = strategy.experimental_local_results(method.memory)[0].numpy()
    _run(trainer, 7)  # 56 positions over 24 examples: every row written, some twice
    copies = [c.numpy() for c in strategy.experimental_local_results(method.memory)]
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy, copies[0])  # replicas agree on every row
    assert np.all(np.any(copies[0] != initial, axis=(1, 2, 3)))  # no row lost
    results.append(([v.numpy() for v in trainer.model.trainable_variables], copies[0]))
  (one_w, one_m), (two_w, two_m) = results
  np.testing.assert_allclose(two_m, one_m, atol=1e-6)
  for a, b in zip(one_w, two_w):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_atta_compiles_with_xla_and_matches_graph_mode():
  was_on = compat.op_determinism_enabled()
  compat.disable_op_determinism()  # XLA's MaxPool gradient (as Experiment does)
  try:
    results = []
    for jit in (False, True):
      trainer, method = _atta_trainer(tf.distribute.get_strategy(), jit=jit)
      _run(trainer, 5)
      results.append(([v.numpy() for v in trainer.model.trainable_variables],
                      method.memory.numpy()))
  finally:
    if was_on:
      tf.config.experimental.enable_op_determinism()
  (a_w, a_m), (b_w, b_m) = results
  np.testing.assert_allclose(b_m, a_m, atol=1e-5)
  for a, b in zip(a_w, b_w):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_atta_is_refused_by_keras_fit_with_the_way_to_train_it():
  from tfadv.keras import adversarial  # pylint: disable=g-import-not-at-top
  model = tiny_cnn(0)
  with pytest.raises(ValueError, match="python -m tfadv.main"):
    adversarial(model, ATTATraining(), batch_size=B)


ATTA = os.path.join(REPO, "configs", "fashion_mnist_atta.gin")


def _main(model_dir, idx_dir, *extra):
  return main_command(ATTA, model_dir, idx_dir, *extra)


@pytest.mark.slow  # a subprocess; the message itself is checked in the fast lane below
def test_a_memory_over_the_limit_stops_with_one_line(tmp_path):
  idx_dir = write_tiny_fashion_idx(tmp_path / "idx")
  result = subprocess.run(_main(tmp_path / "m", idx_dir, "ATTATraining.max_memory_bytes = 100000"),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  message = [l for l in result.stdout.splitlines() + result.stderr.splitlines()
             if "ATTATraining's memory" in l]
  assert len(message) == 1, result.stderr[-2000:]
  # 96 examples × 784 float32 = 294 KiB; the limit named and the way out.
  assert "ATTATraining.max_memory_bytes" in message[0] and "96 examples" in message[0]
  assert "× 1 replica copies" in message[0]
  assert not (tmp_path / "m" / "checkpoint").exists()


def test_memory_size_is_examples_times_entries_times_four_bytes():
  method = ATTATraining()
  assert method.memory_bytes(60000, (28, 28, 1)) == 188_160_000  # Fashion-MNIST, 188 MB
  assert method.memory_bytes(50000, (32, 32, 3)) == 614_400_000  # CIFAR-10
  assert method.memory_bytes(50000, (32, 32, 3), copies=8) == 8 * 614_400_000
  with pytest.raises(SettingError) as error:
    ATTATraining(max_memory_bytes=100 * 2**20).build(None, input_shape=(2, 28, 28, 1),
                                                     num_examples=60000)
  assert "needs 179 MiB (60,000 examples × 784 float32 × 1 replica copies) but the " \
         "limit is 100 MiB (ATTATraining.max_memory_bytes" in str(error.value)
  # Exactly at the limit fits.
  ATTATraining(max_memory_bytes=4 * 784 * 5).build(None, input_shape=(2, 28, 28, 1),
                                                   num_examples=5)
  with pytest.raises(ValueError, match="number of training examples"):
    ATTATraining().build(None, input_shape=(2, 28, 28, 1))


def test_default_limit_is_half_the_available_memory(monkeypatch):
  from tfadv.methods import atta  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(atta, "available_host_memory", lambda: 2 * 4 * 784 * 10)
  ATTATraining().build(None, input_shape=(2, 28, 28, 1), num_examples=10)  # half: fits
  with pytest.raises(SettingError, match="limit is"):
    ATTATraining().build(None, input_shape=(2, 28, 28, 1), num_examples=11)
  monkeypatch.setattr(atta, "available_host_memory", lambda: None)  # unknown: no limit
  ATTATraining().build(None, input_shape=(2, 28, 28, 1), num_examples=11)
  assert atta.available_host_memory is not None
  monkeypatch.undo()
  assert 0 < atta.available_host_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_initial_memory_is_small_seeded_noise_and_checkpointed():
  method = ATTATraining()
  assert method.name == "atta" and method.variables == []
  assert method.get_config() == {  # ATTA-1 at the Fashion-MNIST config's setting
      "epsilon": 0.1, "step_size": 0.025, "num_steps": 1, "clip_min": 0.0,
      "clip_max": 1.0, "init_scale": 0.001, "seed": 0}
  method.build(None, input_shape=(2, 28, 28, 1), num_examples=500)
  assert method.variables == [method.memory]
  memory = method.memory.numpy()
  assert memory.shape == (500, 28, 28, 1)
  assert abs(memory.mean()) < 1e-4 and 0.00095 < memory.std() < 0.00105
  again = ATTATraining()
  again.build(None, input_shape=(2, 28, 28, 1), num_examples=500)
  np.testing.assert_array_equal(again.memory.numpy(), memory)
  other = ATTATraining(seed=1)
  other.build(None, input_shape=(2, 28, 28, 1), num_examples=500)
  assert not np.array_equal(other.memory.numpy(), memory)


def _checkpoint(model_dir):
  """Weights, optimizer state and ATTA's memory in the newest checkpoint, and its step."""
  reader = tf.train.load_checkpoint(str(model_dir))
  shapes = reader.get_variable_to_shape_map()
  keys = sorted(k for k in shapes if k.startswith(("optimizer/", "method")))
  memory = [k for k in keys if shapes[k] == [256, 28, 28, 1]]
  assert len(memory) == 1, keys
  return {k: reader.get_tensor(k) for k in keys}, reader.get_tensor(
      "global_step/.ATTRIBUTES/VARIABLE_VALUE")


@pytest.mark.slow
def test_sigterm_and_resume_give_bit_identical_weights_and_memory(tmp_path):
  idx_dir = write_tiny_fashion_idx(tmp_path / "idx", num_train=256)
  long = ["Experiment.train_epochs = None", "Experiment.train_steps = 600",
          "Experiment.steps_per_loop = 600", "Experiment.checkpoint_every = 600"]
  straight = subprocess.run(_main(tmp_path / "straight", idx_dir, *long), cwd=REPO,
                            capture_output=True, text=True, timeout=600, check=False)
  assert straight.returncode == 0, straight.stderr[-2000:]
  command = _main(tmp_path / "stopped", idx_dir, *long)
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if "Training from step 0" in line:
      break
  time.sleep(4.0)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, output[-2000:]
  _, step = _checkpoint(tmp_path / "stopped")
  assert 0 < step < 600, output[-2000:]
  seconds = lambda d: float(tf.train.load_checkpoint(str(d)).get_tensor(
      "train_seconds/.ATTRIBUTES/VARIABLE_VALUE"))
  before = seconds(tmp_path / "stopped")
  assert 0 < before
  resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0 and f"Training from step {step} to 600" in resumed.stdout
  want, want_step = _checkpoint(tmp_path / "straight")
  got, got_step = _checkpoint(tmp_path / "stopped")
  assert want_step == got_step == 600 and want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Training time is summed over both processes (its accounting is tested on
  # a fake clock in test_controller.py; wall-clock ratios depend on load).
  total, straight_seconds = seconds(tmp_path / "stopped"), seconds(tmp_path / "straight")
  assert before < total, (before, total)
  print(f"ATTA: SIGTERM at step {step} of 600, resumed: weights and memory bit-identical; "
        f"training {before:.1f} s + {total - before:.1f} s vs {straight_seconds:.1f} s straight")


def test_atta_attack_passes_leave_batchnorm_statistics_alone():
  """Only the training pass moves BatchNorm's moving statistics (as PGD's
  ascent passes, and the reference attacks in inference mode): with a zero
  step size every pass sees the same images, so 1 and 5 attack passes must
  leave the same statistics."""
  def stats(num_steps):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 2, 1))
    hidden = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(int(LABELS.max()) + 1)(hidden))
    method = ATTATraining(epsilon=EPS, step_size=0.0, num_steps=num_steps, init_scale=0.05)
    method.build(model, input_shape=(4, 2, 2, 1), num_examples=6)

    def loss_fn(labels, logits, weights):
      return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True) * weights) / 4

    method.compute_gradients(model, loss_fn, tf.constant(IMAGES[:4]), tf.constant(LABELS[:4]),
                             tf.ones([4]), example_ids=tf.constant([0, 1, 2, 3]))
    layer = model.layers[2]
    return layer.moving_mean.numpy(), layer.moving_variance.numpy()

  one, five = stats(1), stats(5)
  np.testing.assert_array_equal(one[0], five[0])
  np.testing.assert_array_equal(one[1], five[1])
  assert np.any(one[0] != 0)  # the training pass did move them


def test_atta_with_random_crops_and_flips_is_refused_in_one_line():
  from tfadv.tasks.image import ImageClassificationTask  # pylint: disable=g-import-not-at-top
  task = ImageClassificationTask(dataset=None, model_fn=lambda *a, **k: None, augment=True)
  with pytest.raises(SettingError, match=r"^ATTATraining keeps each training image's "
                     r"perturbation .* set ImageClassificationTask.augment = False") as caught:
    build_trainer(tiny_cnn, ATTATraining(), global_batch_size=B, task=task)
  assert "\n" not in str(caught.value)


def test_the_memory_limit_reads_available_not_free_memory(tmp_path):
  from tfadv.methods.atta import available_host_memory  # pylint: disable=g-import-not-at-top
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n"
                     "MemAvailable:   20000000 kB\nCached:         18000000 kB\n")
  assert available_host_memory(str(meminfo)) == 20000000 * 1024
  assert available_host_memory(str(tmp_path / "absent")) is not None  # free pages instead
