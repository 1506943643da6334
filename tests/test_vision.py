"""Vision: IDX data, attacks, PGD/FGSM/Free training, robust evaluation, export."""

import json
import os
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf

from builders import IB as B, IC as C, IH as H  # batch, image side, classes
from builders import image_arrays, image_split as split, tiny_cnn
from builders import run as run_experiment, tiny_fashion_bindings, write_idx, write_tiny_fashion_idx
from tfadv import attacks as attacks_lib, compat
from tfadv.attacks import pgd as pgd_lib
from tfadv.attacks import APGD, InputAttack, apgd_checkpoints, dlr_loss
from tfadv.data.images import IdxFormatError, ImageDataset, read_idx
from tfadv.data.pipeline import distributed_dataset
from tfadv.errors import SettingError
from tfadv.methods import FGSMTraining, FreeTraining, PGDTraining, Plain
from tfadv.experiment import build_trainer
from tfadv.tasks.base import sparse_cross_entropy
from tfadv.models.vision import preact_resnet18, small_cnn, wide_resnet

_real_project = attacks_lib.project

EPS = 0.1
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def xla_kernels():
  """XLA's MaxPool gradient is refused while TF's op determinism is on (an
  earlier test in the process may have turned it on); `Experiment` turns it
  off for jit_compile runs in the same way."""
  was_on = compat.op_determinism_enabled()
  compat.disable_op_determinism()
  yield
  if was_on:
    tf.config.experimental.enable_op_determinism()


def make_trainer(strategy, method, jit=False, lr=0.05, attacks=None, seed=0):
  return build_trainer(lambda: tiny_cnn(seed), method, global_batch_size=B,
                       strategy=strategy, optimizer_fn=lambda: keras.optimizers.SGD(lr),
                       split_batch=split, jit_compile=jit, eval_attacks=attacks,
                       input_shape=(B // strategy.num_replicas_in_sync, H, H, 1))


def train(trainer, arrays, steps, replays=1):
  ds = distributed_dataset(trainer.strategy, arrays, B, shuffle=True, seed=5,
                           repeats_per_batch=replays)
  return trainer.train(iter(ds), steps)


def values(model):
  return [v.numpy() for v in model.trainable_variables]


# --- data ------------------------------------------------------------------

def test_idx_reader_round_trip_and_errors(tmp_path):
  images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
  write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images)
  write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.array([1, 2, 9]))
  np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)
  data = ImageDataset("fashion_mnist", source="idx", data_dir=str(tmp_path)).arrays("train")
  assert data["image"].shape == (3, 4, 5, 1) and data["label"].tolist() == [1, 2, 9]

  bad = tmp_path / "truncated-idx3-ubyte"
  bad.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 4, 5) + b"\0" * 10)
  with pytest.raises(IdxFormatError, match="truncated-idx3-ubyte.*60 bytes.*10 bytes"):
    read_idx(str(bad))
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    ImageDataset("fashion_mnist", source="idx", data_dir=str(tmp_path / "nowhere")).arrays("train")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="apt-get install -y dataset-fashion-mnist (.ci/run does)")
def test_debian_fashion_mnist_is_read_from_its_idx_files():
  data = ImageDataset("fashion_mnist", source="auto")
  train, test = data.arrays("train"), data.arrays("eval")
  assert train["image"].shape == (60000, 28, 28, 1) and test["image"].shape == (10000, 28, 28, 1)
  assert train["image"].dtype == np.uint8 and train["image"].max() == 255
  # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
  assert np.bincount(train["label"]).tolist() == [6000] * 10
  assert np.bincount(test["label"]).tolist() == [1000] * 10


# --- attacks ---------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_pgd_iterate_stays_in_the_ball_and_pixel_range(norm, monkeypatch):
  model = tiny_cnn()
  x, y = split(image_arrays())
  eps = EPS if norm == "linf" else 0.5
  iterates = []
  monkeypatch.setattr(pgd_lib, "project", lambda *a, **k: iterates.append(
      _real_project(*a, **k)) or iterates[-1])
  attack = InputAttack(epsilon=eps, step_size=eps / 2, num_steps=5, norm=norm,
                       random_start=True)
  x_adv = attack(model, x, y, rng=tf.random.Generator.from_seed(1)).numpy()
  assert len(iterates) == 6  # the random start and every one of the 5 steps
  np.testing.assert_array_equal(iterates[-1].numpy(), x_adv)
  sizes = []
  for iterate in iterates:
    iterate = iterate.numpy()
    assert iterate.min() >= 0.0 and iterate.max() <= 1.0
    delta = (iterate - x.numpy()).reshape(len(iterate), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5)
    sizes.append(size.max())
  assert min(sizes[1:]) > 0.5 * eps  # every step moved


def test_pgd_raises_the_loss_more_than_fgsm_and_a_random_point():
  model = tiny_cnn()
  # Train a little so the loss surface is not flat.
  trainer = make_trainer(tf.distribute.get_strategy(), Plain(), lr=0.1)
  arrays = image_arrays(64)
  train(trainer, arrays, 30)
  model = trainer.model
  x, y = split(arrays)
  rng = tf.random.Generator.from_seed(0)

  def loss(images):
    return float(tf.reduce_mean(sparse_cross_entropy(y, model(images))))

  noise = tf.clip_by_value(x + rng.uniform(x.shape, -EPS, EPS), 0, 1)
  fgsm = InputAttack(epsilon=EPS, num_steps=1)(model, x, y)
  pgd = InputAttack(epsilon=EPS, step_size=EPS / 4, num_steps=10, random_start=True)(
      model, x, y, rng=rng)
  assert loss(x) < loss(noise) < loss(fgsm) <= loss(pgd) + 1e-6


# --- training methods ------------------------------------------------------

def _free_reference_step(model, x, y, before):
  """Shafahi et al.'s update of δ, by hand: the input gradient at the clamped
  point, zeroed where x + δ lies outside [0, 1] (the clamp's derivative)."""
  x_adv = tf.clip_by_value(x + before, 0, 1)
  with tf.GradientTape() as tape:
    tape.watch(x_adv)
    loss = tf.reduce_sum(sparse_cross_entropy(y, model(x_adv, training=True)))
  inside = ((x.numpy() + before) >= 0) & ((x.numpy() + before) <= 1)
  g = tape.gradient(loss, x_adv).numpy() * inside
  return np.clip(before + EPS * np.sign(g), -EPS, EPS)


def test_free_buffer_persists_across_steps_and_follows_the_sign_rule():
  arrays = image_arrays(B)  # one batch: every step sees the same images
  method = FreeTraining(epsilon=EPS, replays=1, clamp_rule="reference")
  trainer = make_trainer(tf.distribute.get_strategy(), method, lr=0.0)
  order = next(iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=True, seed=5)))
  x, y = split(order)
  deltas = []
  for _ in range(3):
    before = method.perturbation.numpy()
    expected = _free_reference_step(trainer.model, x, y, before)
    train(trainer, arrays, 1)
    np.testing.assert_allclose(method.perturbation.numpy(), expected, atol=1e-7)
    deltas.append(method.perturbation.numpy())
  # Carried over: a buffer reset before each step would hold ±ε wherever the
  # gradient is non-zero; a carried one returns to 0 where the sign flipped.
  flipped = (deltas[1] == 0) & (deltas[0] != 0)
  assert flipped.sum() > 0
  assert np.all(deltas[0][flipped] * deltas[1][flipped] == 0)


def test_free_leaves_clamped_pixels_of_the_buffer_where_they_are():
  # A black background (x = 0) with δ = −ε/2 there: x + δ < 0 is clamped to 0,
  # the clamp's gradient is zero, and δ must not move (Shafahi et al.'s code);
  # the gradient at the clamped image would move it.
  arrays = image_arrays(B)
  arrays["image"][:, :, : H // 2] = 0
  arrays["image"][:, :, H // 2:] = np.clip(arrays["image"][:, :, H // 2:], 40, 215)
  method = FreeTraining(epsilon=EPS, replays=1, clamp_rule="reference")
  trainer = make_trainer(tf.distribute.get_strategy(), method, lr=0.0)
  method.perturbation.assign(np.full(method.perturbation.shape, -EPS / 2, np.float32))
  order = next(iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=True, seed=5)))
  x, y = split(order)
  expected = _free_reference_step(trainer.model, x, y, method.perturbation.numpy())
  train(trainer, arrays, 1)
  after = method.perturbation.numpy()
  np.testing.assert_array_equal(after[:, :, : H // 2], np.float32(-EPS / 2))  # clamped: unmoved
  interior = after[:, :, H // 2:]
  assert np.isin(interior, [np.float32(-EPS), np.float32(EPS / 2)]).mean() > 0.9  # moved by ±ε
  np.testing.assert_allclose(after, expected, atol=1e-7)
  # "straight_through" (tfadv's earlier rule): the clamped entries move too.
  earlier = FreeTraining(epsilon=EPS, replays=1, clamp_rule="straight_through")
  trainer = make_trainer(tf.distribute.get_strategy(), earlier, lr=0.0)
  earlier.perturbation.assign(np.full(earlier.perturbation.shape, -EPS / 2, np.float32))
  x_adv = tf.clip_by_value(x - EPS / 2, 0, 1)
  with tf.GradientTape() as tape:
    tape.watch(x_adv)
    loss = tf.reduce_sum(sparse_cross_entropy(y, trainer.model(x_adv, training=True)))
  want = np.clip(-EPS / 2 + EPS * np.sign(tape.gradient(loss, x_adv).numpy()), -EPS, EPS)
  train(trainer, arrays, 1)
  np.testing.assert_allclose(earlier.perturbation.numpy(), want, atol=1e-7)
  assert np.any(earlier.perturbation.numpy()[:, :, : H // 2] != np.float32(-EPS / 2))


def _linear_images():
  """A linear model on 2×2 images and a batch with black and white pixels."""
  inputs = keras.Input((2, 2, 1))
  layer = keras.layers.Dense(3)
  model = keras.Model(inputs, layer(keras.layers.Flatten()(inputs)))
  weights = np.array([[1.0, -1, 0.5], [-2, 1, 0], [0.5, 0.5, -1], [1, -1, 2]], np.float32)
  layer.set_weights([weights, np.zeros(3, np.float32)])
  images = np.array([[[0.0, 1.0], [0.5, 0.02]], [[0.0, 0.0], [1.0, 0.97]]], np.float32)
  return model, weights, images[..., None], np.array([0, 2], np.int32)


def _project_reference(weights, x, y, delta, eps, replays):
  """Free-m under "project", by hand: box = [max(−ε, −x), min(ε, 1 − x)];
  δ ← Π_box(δ); g = ∂CE/∂x at x + δ (softmax − one-hot times Wᵀ);
  δ ← Π_box(δ + ε·sign(g)). Returns the δ after each replay."""
  low, high = np.maximum(-eps, -x), np.minimum(eps, 1 - x)
  out = []
  for _ in range(replays):
    delta = np.clip(delta, low, high)
    z = (x + delta).reshape(len(x), -1) @ weights
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    g = (p @ weights.T).reshape(x.shape)
    delta = np.clip(delta + eps * np.sign(g), low, high)
    out.append(delta)
  return out


def test_free_project_rule_keeps_delta_feasible_and_moves_every_entry():
  model, weights, images, labels = _linear_images()
  eps = 0.1
  method = FreeTraining(epsilon=eps, replays=3)  # the default rule: "project"
  assert method.clamp_rule == "project"
  trainer = build_trainer(lambda: model, method, global_batch_size=2,
                          optimizer_fn=lambda: keras.optimizers.SGD(0.0),
                          split_batch=lambda b: (b["image"], b["label"]), input_shape=(2, 2, 2, 1))
  # A stored δ that is out of range for this batch (as a previous batch leaves it).
  start = np.array([[[-0.1, 0.1], [0.05, -0.1]], [[0.1, -0.1], [0.1, 0.1]]], np.float32)[..., None]
  method.perturbation.assign(start)

  def replays(batch_images, steps):
    ds = distributed_dataset(trainer.strategy, {"image": batch_images, "label": labels}, 2,
                             shuffle=False, num_steps=steps, repeats_per_batch=steps)
    deltas, stuck = [], []
    iterator = iter(ds)
    for _ in range(steps):
      stuck.append(trainer.train(iterator, 1)["stuck"])
      deltas.append(method.perturbation.numpy())
    return deltas, stuck

  got, stuck = replays(images, 3)
  want = _project_reference(weights, images, labels, start, eps, 3)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-7)
    assert np.all(images + g >= 0) and np.all(images + g <= 1)
    assert np.all(np.abs(g) <= eps + 1e-7)
  assert stuck == [0.0, 0.0, 0.0]  # no entry's gradient is zeroed
  # A new batch: the carried δ is projected onto the new images' box first.
  new_images = images[::-1].copy()
  got, _ = replays(new_images, 1)
  want = _project_reference(weights, new_images, labels, want[-1], eps, 1)
  np.testing.assert_allclose(got[0], want[0], atol=1e-7)
  assert np.all(new_images + got[0] >= 0) and np.all(new_images + got[0] <= 1)


def test_stuck_share_is_zero_for_project_and_positive_for_the_reference_rule():
  # A black background with δ at −ε/2 there: under the reference rule x + δ is
  # clamped, the gradient is zero, those entries are stuck; "project" moves δ
  # back into the box before the pass, so none is.
  arrays = image_arrays(B)
  arrays["image"][:, :, : H // 2] = 0
  arrays["image"][:, :, H // 2:] = np.clip(arrays["image"][:, :, H // 2:], 40, 215)
  shares = {}
  for rule in ("project", "reference", "straight_through"):
    method = FreeTraining(epsilon=EPS, replays=1, clamp_rule=rule)
    # A linear model: every pixel has a non-zero gradient (max-pooling and
    # ReLU would zero some under any rule).
    trainer = build_trainer(
        lambda: keras.Sequential([keras.Input((H, H, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(C)]),
        method, global_batch_size=B, optimizer_fn=lambda: keras.optimizers.SGD(0.0),
        split_batch=split, input_shape=(B, H, H, 1))
    method.perturbation.assign(np.full(method.perturbation.shape, -EPS / 2, np.float32))
    shares[rule] = train(trainer, arrays, 1)["stuck"]
  assert shares["project"] == 0.0 and shares["straight_through"] == 0.0
  assert shares["reference"] >= 0.5  # the black half of every image


def test_free_through_clamp_names_its_replacement():
  from tfadv.errors import SettingError  # pylint: disable=g-import-not-at-top
  for value, rule in ((True, "'reference'"), (False, "'straight_through'")):
    with pytest.raises(SettingError, match=f"FreeTraining.clamp_rule: bind clamp_rule = {rule}"):
      FreeTraining(through_clamp=value)


def test_free_with_one_replay_and_zero_buffer_is_plain_training_then_fgsm():
  arrays = image_arrays(B)
  free = make_trainer(tf.distribute.get_strategy(),
                      FreeTraining(epsilon=EPS, replays=1, clamp_rule="reference"))
  plain = make_trainer(tf.distribute.get_strategy(), Plain())
  train(free, arrays, 1)
  train(plain, arrays, 1)
  for a, b in zip(values(free.model), values(plain.model)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The buffer is then the FGSM perturbation of the clean batch (pre-update weights).
  reference = tiny_cnn()
  batch = next(iter(distributed_dataset(free.strategy, arrays, B, shuffle=True, seed=5)))
  x, y = split(batch)
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = tf.reduce_sum(sparse_cross_entropy(y, reference(x, training=True)))
  np.testing.assert_array_equal(free.method.perturbation.numpy(),
                                EPS * np.sign(tape.gradient(loss, x).numpy()))


def test_free_replays_are_training_passes():
  """Free's one pass per replay runs the model in training mode: with batch
  normalisation (batch statistics, not the moving ones) its weight gradients
  and δ's ascent are those of a hand-made `training=True` pass."""
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((H, H, 1)), keras.layers.Conv2D(3, 3),
                            keras.layers.BatchNormalization(), keras.layers.Flatten(),
                            keras.layers.Dense(C)])
  x, y = split(image_arrays(B))
  fn = lambda labels, logits, weights: tf.reduce_sum(sparse_cross_entropy(labels, logits))
  method = FreeTraining(epsilon=EPS, replays=1, clamp_rule="reference")
  method.build(model, input_shape=(B, H, H, 1))
  out = method.compute_gradients(model, fn, x, y, tf.ones([B]))
  by_mode = {}
  for training in (True, False):
    with tf.GradientTape() as tape:
      tape.watch(x)  # δ = 0: the pass is at x
      loss = fn(y, model(x, training=training), None)
    by_mode[training] = tape.gradient(loss, model.trainable_variables + [x])
  *want, g = by_mode[True]
  assert not np.allclose(by_mode[False][0].numpy(), want[0].numpy(), atol=1e-4)  # it matters
  for got, expected in zip(out.gradients, want):
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(method.perturbation.numpy(), EPS * np.sign(g.numpy()))


def test_free_buffer_is_distinct_per_replica(mirrored):
  method = FreeTraining(epsilon=EPS, replays=2)
  trainer = make_trainer(mirrored, method)
  assert method.perturbation.shape == (B // 2, H, H, 1)
  train(trainer, image_arrays(), 4, replays=2)
  local = [v.numpy() for v in mirrored.experimental_local_results(method.perturbation)]
  assert len(local) == 2 and local[0].shape == (B // 2, H, H, 1)
  assert np.abs(local[0]).max() > 0 and not np.array_equal(local[0], local[1])


def test_replays_deliver_each_batch_m_times_and_resume_mid_batch():
  arrays = {"i": np.arange(40, dtype=np.int64)}
  strategy = tf.distribute.get_strategy()

  def batches(start, steps):
    ds = distributed_dataset(strategy, arrays, 4, shuffle=True, seed=1,
                             start_step=start, num_steps=steps, repeats_per_batch=3)
    return [(b["i"].numpy().tolist(), b["replay_index"].numpy().tolist()) for b in ds]

  full = batches(0, 9)
  rows = [r for r, _ in full]
  assert rows[0] == rows[1] == rows[2] and rows[3] == rows[4] == rows[5] != rows[0]
  # Every example of a batch carries the batch's replay: 0, 1, 2, 0, 1, 2, ...
  assert [replay for _, replay in full] == [[step % 3] * 4 for step in range(9)]
  assert batches(4, 5) == full[4:]  # resumed after the 2nd replay of batch 1


@pytest.mark.parametrize("method_fn", [
    lambda: PGDTraining(epsilon=EPS, step_size=0.03, num_steps=3, random_start=False),
    lambda: PGDTraining(epsilon=0.5, step_size=0.2, num_steps=2, norm="l2", random_start=False),
    lambda: FGSMTraining(epsilon=EPS, random_start=False),
    lambda: FreeTraining(epsilon=EPS, replays=2),
], ids=["pgd_linf", "pgd_l2", "fgsm", "free"])
@pytest.mark.slow
def test_vision_steps_compile_with_xla_and_match_graph_mode(method_fn, xla_kernels):
  arrays = image_arrays()
  results = []
  for jit in (False, True):
    trainer = make_trainer(tf.distribute.get_strategy(), method_fn(), jit=jit)
    train(trainer, arrays, 4, replays=trainer.method.batch_replays)
    results.append(values(trainer.model))
    if jit:
      batch = next(iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=False)))
      hlo = trainer._replica_train.experimental_get_compiler_ir(batch)(stage="hlo")
      assert "HloModule" in hlo
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_random_start_methods_compile_with_xla(xla_kernels, monkeypatch):
  # XLA's random-number kernel draws another stream than TensorFlow's, so the
  # draw itself is replaced by a fixed pattern of the same shape and range;
  # everything else (start, projection, ascent, update) is compared weight
  # for weight.
  def fixed_uniform(self, shape, minval=0.0, maxval=1.0, dtype=tf.float32):
    del self
    count = tf.reduce_prod(shape)
    pattern = 0.5 + 0.5 * tf.sin(tf.cast(tf.range(count), dtype) * 12.9898)
    return tf.reshape(minval + (maxval - minval) * pattern, shape)

  monkeypatch.setattr(tf.random.Generator, "uniform", fixed_uniform)
  for make in (lambda: PGDTraining(epsilon=EPS, num_steps=2),
               lambda: FGSMTraining(epsilon=EPS)):
    results = []
    for jit in (False, True):
      trainer = make_trainer(tf.distribute.get_strategy(), make(), jit=jit)
      before = values(trainer.model)
      metrics = train(trainer, image_arrays(), 2)
      assert np.isfinite(metrics["loss"])
      assert any(not np.array_equal(a, b) for a, b in zip(before, values(trainer.model)))
      results.append(values(trainer.model))
    for a, b in zip(*results):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_pgd_on_two_replicas_equals_one_device(mirrored):
  arrays = image_arrays(4 * B)
  results = []
  for strategy in (tf.distribute.get_strategy(), mirrored):
    method = PGDTraining(epsilon=EPS, step_size=0.03, num_steps=3, random_start=False)
    trainer = make_trainer(strategy, method)
    train(trainer, arrays, 5)
    results.append(values(trainer.model))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_robust_evaluation_is_ordered_and_repeatable():
  attacks = {"fgsm": InputAttack(epsilon=EPS, num_steps=1),
             "pgd20": InputAttack(epsilon=EPS, step_size=EPS / 4, num_steps=20,
                                  random_start=True, restarts=2)}
  trainer = make_trainer(tf.distribute.get_strategy(), Plain(), lr=0.1, attacks=attacks)
  arrays = image_arrays(64)
  train(trainer, arrays, 30)

  def evaluate():
    ds = distributed_dataset(trainer.strategy, arrays, B, shuffle=False)
    return trainer.evaluate(iter(ds), len(arrays["label"]) // B)

  first, second = evaluate(), evaluate()
  assert first == second
  assert first["accuracy"] > first["accuracy_fgsm"] >= first["accuracy_pgd20"]


# --- models and end to end -------------------------------------------------

def test_models_have_the_published_shapes():
  assert small_cnn((28, 28, 1), 10).count_params() == 3274634  # Madry's MNIST CNN
  assert preact_resnet18((32, 32, 3), 10).count_params() == pytest.approx(11.17e6, rel=0.01)
  wrn = wide_resnet((32, 32, 3), 10, depth=28, width=10)
  assert wrn.count_params() == pytest.approx(36.5e6, rel=0.01)  # WRN-28-10
  assert len([l for l in wide_resnet((32, 32, 3), 10, depth=32, width=1).layers
              if isinstance(l, keras.layers.Add)]) == 15  # 5 blocks per stage
  with pytest.raises(ValueError, match="6n"):
    wide_resnet((32, 32, 3), 10, depth=30)


def fashion_bindings(tmp_path):
  """A tiny Fashion-MNIST-shaped IDX set and a small config."""
  return tiny_fashion_bindings(write_tiny_fashion_idx(tmp_path / "idx"))


@pytest.mark.slow
def test_free_divides_epochs_and_end_to_end_evaluate_and_export(tmp_path):
  bindings = fashion_bindings(tmp_path)
  natural = (bindings, ["configs/fashion_mnist_plain.gin"])
  free = (bindings, ["configs/fashion_mnist_free8.gin"])
  default = tf.distribute.get_strategy()
  out_natural = run_experiment("train_and_evaluate", tmp_path / "natural", default, *natural)
  out_free = run_experiment("train_and_evaluate", tmp_path / "free", default, *free)
  # 96 images / 16 = 6 batches per epoch; 8 epochs = 48 steps. Free-8 takes
  # as many optimizer steps over 1/8 of the epochs: 6 batches x 8 replays.
  assert out_natural["experiment"].train_steps == 48
  assert out_free["experiment"].train_steps == 48
  assert out_free["experiment"].steps_per_loop % 8 == 0
  evaluated = out_natural["eval"]
  assert set(evaluated) >= {"accuracy", "accuracy_fgsm", "accuracy_pgd20"}
  assert evaluated["accuracy"] > 0.3  # learnable data: well above chance (0.1)
  assert evaluated["accuracy"] >= evaluated["accuracy_fgsm"] >= evaluated["accuracy_pgd20"]
  again = run_experiment("evaluate", tmp_path / "natural", default, *natural)
  assert again["eval"] == evaluated
  assert any("accuracy_pgd20" in line for line in again["lines"])
  exported = run_experiment("export", tmp_path / "natural", default, *natural)["export"]
  model = keras.models.load_model(exported)
  x = tf.random.uniform((2, 28, 28, 1))
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = model(x)
    total = tf.reduce_sum(logits)
  assert logits.shape == (2, 10) and tape.gradient(total, x).shape == x.shape


def test_coupled_l2_equals_sgd_on_the_loss_plus_madrys_term():
  from tfadv.optimization import sgd_momentum  # pylint: disable=g-import-not-at-top
  x, y = split(image_arrays(B))
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((H, H, 1)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(),
                            keras.layers.Flatten(), keras.layers.Dense(C)])
  start = [v.numpy() for v in model.trainable_variables]
  kernels = [v for v in model.trainable_variables if "kernel" in v.name]
  assert len(kernels) == 2

  def run(optimizer, with_term, steps=3):
    for v, value in zip(model.trainable_variables, start):
      v.assign(value)
    for _ in range(steps):  # the term must pass through momentum
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(sparse_cross_entropy(y, model(x, training=False)))
        if with_term:
          loss += 2e-4 * tf.add_n([tf.nn.l2_loss(k) for k in kernels])
      optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                    model.trainable_variables))
    return [v.numpy() for v in model.trainable_variables]

  reference = run(keras.optimizers.SGD(0.5, momentum=0.9), with_term=True)
  coupled = run(sgd_momentum(total_steps=100, learning_rate=0.5, weight_decay_mode="l2"), False)
  decoupled = run(sgd_momentum(total_steps=100, learning_rate=0.5), False)
  for got, want in zip(coupled, reference):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  # Biases and BatchNorm's γ/β carry no term (after one step, before the
  # kernels' change reaches their gradients); kernels do.
  plain = run(keras.optimizers.SGD(0.5, momentum=0.9), with_term=False, steps=1)
  one = run(sgd_momentum(total_steps=100, learning_rate=0.5, weight_decay_mode="l2"), False, 1)
  for got, base, v in zip(one, plain, model.trainable_variables):
    assert np.array_equal(got, base) != ("kernel" in v.name), v.name
  assert not np.allclose(decoupled[0], coupled[0], rtol=1e-7, atol=0)
  with pytest.raises(ValueError, match="'decoupled', 'l2'"):
    sgd_momentum(total_steps=10, weight_decay_mode="coupled")


@pytest.mark.slow
def test_coupled_l2_in_keras_fit_on_two_replicas_equals_one_device(mirrored):
  # Keras's own fit all-reduces the gradients inside the optimizer: the L2
  # term must be added once after that, not on every replica before it.
  from tfadv.optimization import SGDWithL2  # pylint: disable=g-import-not-at-top
  x, y = split(image_arrays(B))
  keras.utils.set_random_seed(0)
  start = [v.numpy() for v in tiny_cnn(0).trainable_variables]

  def fit(strategy):
    with strategy.scope():
      model = tiny_cnn(0)
      for v, value in zip(model.trainable_variables, start):
        v.assign(value)
      model.compile(optimizer=SGDWithL2(learning_rate=0.5, momentum=0.9, l2=0.05),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]

  one, two = fit(tf.distribute.get_strategy()), fit(mirrored)
  moved = 0
  for got, want, first in zip(two, one, start):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    moved += not np.allclose(want, first)
  assert moved >= 2


def test_attack_passes_draw_their_own_dropout_masks_and_leave_bn_statistics():
  # Conv-BN-Dropout: Dropout on the input, so each pass's mask is visible in
  # what the recording layer after it sees (this test runs eagerly).
  seen = []
  keras.utils.set_random_seed(0)
  inputs = keras.Input((H, H, 1))
  dropped = keras.layers.Dropout(0.5, seed=1)(inputs)
  recorded = keras.layers.Lambda(lambda t: seen.append(t) or t)(dropped)
  conv = keras.layers.Conv2D(4, 3, name="conv")
  bn = keras.layers.BatchNormalization(momentum=0.9, name="bn")
  x = keras.layers.ReLU()(bn(conv(recorded)))
  model = keras.Model(inputs, keras.layers.Dense(C)(keras.layers.Flatten()(x)))
  arrays = image_arrays(B)
  arrays["image"] = np.clip(arrays["image"], 60, 200)  # no pixel clamping
  images, labels = split(arrays)
  method = PGDTraining(epsilon=EPS, step_size=EPS / 2, num_steps=2, random_start=False)
  method.build(model)
  seen.clear()
  method.compute_gradients(model, lambda y, z, w: tf.reduce_mean(sparse_cross_entropy(y, z)),
                           images, labels, tf.ones([B]))
  assert len(seen) == 3  # two ascent passes, one training pass
  masks = [t.numpy() == 0 for t in seen]
  assert all(0.4 < m.mean() < 0.6 for m in masks)
  for i in range(3):
    for j in range(i):
      assert not np.array_equal(masks[i], masks[j]), (i, j)  # independent masks
  # Moving statistics: one update, from the training pass on the adversarial
  # batch only (momentum 0.9 from the initial 0 mean).
  batch_mean = tf.reduce_mean(conv(seen[2]), axis=[0, 1, 2]).numpy()
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * batch_mean, rtol=1e-5, atol=1e-7)


# --- APGD and worst-case evaluation ----------------------------------------

def _linear(weights, bias):
  inputs = keras.Input((weights.shape[0],))
  layer = keras.layers.Dense(weights.shape[1])
  model = keras.Model(inputs, layer(inputs))
  layer.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
  return model


def _closed_form_worst(x, y, weights, bias, eps):
  """The ℓ∞ ∩ [0, 1] point of least margin z_y − z_other for a linear model:
  each pixel moves by ε against the sign of its margin weight."""
  other = 1 - y
  w = weights[:, y].T - weights[:, other].T  # per example, D
  worst = np.clip(x - eps * np.sign(w), 0, 1)
  margin = (w * worst).sum(1) + bias[y] - bias[other]
  return worst, margin


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_finds_the_closed_form_worst_case_of_a_linear_model(loss):
  rng = np.random.RandomState(0)
  d, n, eps = 20, 200, 0.1
  weights, bias = rng.randn(d, 2) * 0.2, np.zeros(2)  # no example saturates the softmax
  x = rng.uniform(0, 1, (n, d)).astype(np.float32)
  y = (x @ weights).argmax(1).astype(np.int32)  # all clean examples correct
  if loss == "dlr":  # DLR needs 3 classes: a third that is never near the top
    weights, bias = np.concatenate([weights, np.zeros((d, 1))], 1), np.array([0, 0, -50.0])
  model = _linear(weights, bias)
  worst, margin = _closed_form_worst(x, y, weights[:, :2], bias[:2], eps)
  assert 0.2 < (margin > 0).mean() < 0.9  # some, not all, can be broken
  attack = APGD(epsilon=eps, num_steps=20, loss=loss)
  x_adv = attack(model, tf.constant(x), tf.constant(y), rng=tf.random.Generator.from_seed(0)).numpy()
  assert np.all(np.abs(x_adv - x) <= eps + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1
  held = model(x_adv).numpy().argmax(1) == y
  np.testing.assert_array_equal(held, margin > 0)  # exactly the breakable ones broken
  if loss == "dlr":
    return  # DLR's maximiser is not the least-margin point (its denominator moves too)
  # Where the model holds, CE-APGD's point reaches the closed-form least margin.
  z = x_adv @ weights[:, :2] + bias[:2]
  reached = z[np.arange(n), y] - z[np.arange(n), 1 - y]
  np.testing.assert_allclose(reached[held], margin[held], atol=1e-5)


def test_dlr_loss_matches_its_formula():
  logits = np.array([[3.0, 1.0, 0.5, -2.0], [0.2, 2.5, 1.0, 0.0], [1.0, 1.0, 0.0, -1.0]], np.float32)
  labels = np.array([0, 0, 1], np.int32)
  want = []
  for z, y in zip(logits, labels):
    s = np.sort(z)[::-1]
    want.append(-(z[y] - max(np.delete(z, y))) / (s[0] - s[2] + 1e-12))
  np.testing.assert_allclose(dlr_loss(tf.constant(labels), tf.constant(logits)).numpy(), want,
                             rtol=1e-6)


def test_apgd_checkpoints_follow_croce_and_hein():
  # N = 100: first check after 22 iterations, then intervals 19, 16, 13, 10, 7, 6, 6...
  checks = apgd_checkpoints(100)
  assert list(checks)[:6] == [21, 40, 56, 69, 79, 86]
  assert list(checks.values())[:8] == [22, 19, 16, 13, 10, 7, 6, 6]


@pytest.mark.slow
def test_apgd_is_at_least_as_strong_as_pgd_and_compiles_with_xla(xla_kernels):
  trainer = make_trainer(tf.distribute.get_strategy(), Plain(), lr=0.1)
  arrays = image_arrays(64)
  train(trainer, arrays, 30)
  model = trainer.model
  x, y = split(arrays)
  pgd = InputAttack(epsilon=EPS, step_size=EPS / 4, num_steps=10, random_start=True)
  apgd = APGD(epsilon=EPS, num_steps=40, loss="ce")
  held = lambda images: model(images, training=False).numpy().argmax(1) == np.asarray(y)
  x_pgd = pgd(model, x, y, rng=tf.random.Generator.from_seed(0))
  x_apgd = apgd(model, x, y, rng=tf.random.Generator.from_seed(0))
  # At most one image of 64 where PGD-10's random start got luckier.
  assert held(x_apgd).sum() <= held(x_pgd).sum() + 1
  rng = tf.random.Generator.from_seed(0)
  compiled = tf.function(lambda images, labels: apgd(model, images, labels, rng=rng),
                         jit_compile=True)
  x_xla = compiled(x, y).numpy()
  assert np.all(np.abs(x_xla - x.numpy()) <= EPS + 1e-6)
  assert held(x_xla).mean() <= held(x).mean()


def test_restarts_keep_each_examples_breaking_run():
  # Two runs that disagree per example: run 1 breaks example 0 only, run 2
  # breaks example 1 only. The attack must return an image that breaks both.
  model = _linear(np.eye(2), np.zeros(2))  # logits = x
  x = tf.constant([[1.0, 0.0], [1.0, 0.0]])
  y = tf.constant([0, 0])
  runs = iter([tf.constant([[0.0, 1.0], [1.0, 0.0]]), tf.constant([[1.0, 0.0], [0.0, 1.0]])])

  class Scripted(InputAttack):
    def _one_run(self, *args):
      return next(runs)

  x_adv = Scripted(epsilon=1.0, restarts=2, random_start=True)(
      model, x, y, rng=tf.random.Generator.from_seed(0)).numpy()
  assert np.all(model(x_adv).numpy().argmax(1) != y.numpy())


def test_worst_case_accuracy_counts_examples_no_attack_breaks():
  # logits = image; the two attacks each break half the examples, different halves.
  n = 8
  labels = np.arange(n) % 2
  images = np.eye(2, dtype=np.float32)[labels]

  class Breaking(attacks_lib.Attack):
    def __init__(self, parity):
      self.parity = parity

    def __call__(self, model, x, y, rng=None, loss_fn=None):
      flip = tf.equal(tf.range(tf.shape(x)[0]) % 2, self.parity)[:, None]
      return tf.where(flip, 1.0 - x, x)

  breaking = Breaking

  strategy = tf.distribute.get_strategy()
  trainer = build_trainer(lambda: _linear(np.eye(2), np.zeros(2)), Plain(),
                          global_batch_size=n, optimizer_fn=lambda: keras.optimizers.SGD(0.0),
                          split_batch=lambda b: (b["image"], b["label"]),
                          eval_attacks={"even": breaking(0), "odd": breaking(1)})
  ds = distributed_dataset(strategy, {"image": images, "label": labels.astype(np.int32)},
                           n, shuffle=False)
  metrics = trainer.evaluate(iter(ds), 1)
  assert metrics["accuracy"] == 1.0
  assert metrics["accuracy_even"] == 0.5 and metrics["accuracy_odd"] == 0.5
  assert metrics["accuracy_worst_case"] == 0.0


def test_warm_up_runs_plain_steps_until_the_start_then_the_method():
  # adversarial_start_step = 3: steps 0-2 are plain steps (a loop never
  # crosses the start), steps 3-4 FGSM-RS. References: a plain trainer for
  # the first three, then an FGSM-RS trainer started from those weights on
  # the batches of steps 3 and 4 (SGD has no state to carry over).
  arrays = image_arrays(4 * B)
  default = tf.distribute.get_strategy()
  warm = build_trainer(lambda: tiny_cnn(0), FGSMTraining(epsilon=EPS), global_batch_size=B,
                       optimizer_fn=lambda: keras.optimizers.SGD(0.05), split_batch=split,
                       adversarial_start_step=3)
  iterator = iter(distributed_dataset(default, arrays, B, shuffle=True, seed=5))
  first = warm.train(iterator, 5)
  assert first["steps"] == 3 and first["adversarial"] == 0.0
  plain = make_trainer(default, Plain())
  train(plain, arrays, 3)
  for a, b in zip(values(warm.model), values(plain.model)):
    np.testing.assert_array_equal(a, b)
  second = warm.train(iterator, 2)
  assert second["steps"] == 2 and second["adversarial"] == 1.0
  fgsm = make_trainer(default, FGSMTraining(epsilon=EPS))
  for target, source in zip(fgsm.model.trainable_variables, plain.model.trainable_variables):
    target.assign(source)
  fgsm.train(iter(distributed_dataset(default, arrays, B, shuffle=True, seed=5,
                                      start_step=3)), 2)
  for a, b in zip(values(warm.model), values(fgsm.model)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Plain training of steps 3 and 4 would have gone elsewhere.
  plain.train(iter(distributed_dataset(default, arrays, B, shuffle=True, seed=5,
                                       start_step=3)), 2)
  assert any(not np.allclose(a, b) for a, b in zip(values(warm.model), values(plain.model)))


@pytest.mark.slow
def test_warm_up_from_a_gin_binding_splits_the_first_loop_at_the_start(tmp_path):
  bindings = fashion_bindings(tmp_path) + ["Experiment.adversarial_start_step = 5",
                                           "Experiment.epsilon_ramp_steps = 8"]
  out = run_experiment("train", tmp_path / "m", tf.distribute.get_strategy(), bindings,
                       ["configs/fashion_mnist_fgsm.gin"])
  steps = [line for line in out["lines"] if line.startswith("step ")]
  # Loops of 8 steps, the first one cut at the start: 5 plain steps, then FGSM-RS.
  assert steps[0].startswith("step 5/48") and "adversarial 0 " in steps[0]
  assert steps[1].startswith("step 8/48") and "adversarial 1 " in steps[1]
  # The ramp: steps 5-7 at 1/8, 2/8, 3/8 of ε (mean 0.25), full ε from step 12.
  assert "epsilon_scale" not in steps[0] and "epsilon_scale 0.25 " in steps[1]
  assert "epsilon_scale 1 " in steps[-1]
  assert steps[-1].startswith("step 48/48")


@pytest.mark.slow
def test_validation_split_is_carved_from_train_and_a_training_records_it(tmp_path):
  """`ImageDataset.validation_fraction`: train and validation partition the
  train file (stratified by label, seeded); test is untouched. `--mode=train`
  records the validation evaluation without reading the test files (deleted
  here), which is what a choice made on validation needs."""
  idx_dir = write_tiny_fashion_idx(tmp_path / "idx", num_train=200)
  whole = ImageDataset("fashion_mnist", source="idx", data_dir=idx_dir)
  carved = ImageDataset("fashion_mnist", source="idx", data_dir=idx_dir,
                        validation_fraction=0.25)
  assert carved.splits == ("train", "validation", "eval")
  train, validation = carved.arrays("train"), carved.arrays("validation")
  everything = whole.arrays("train")
  assert len(train["label"]) + len(validation["label"]) == 200
  assert 45 <= len(validation["label"]) <= 55
  rows = lambda a: sorted(map(bytes, a["image"].reshape(len(a["image"]), -1)))
  assert sorted(rows(train) + rows(validation)) == rows(everything)
  assert not set(rows(train)) & set(rows(validation))
  for label in range(10):  # stratified: a quarter of each label, rounded
    count = int(np.sum(everything["label"] == label))
    assert np.sum(validation["label"] == label) == round(count * 0.25), label
  np.testing.assert_array_equal(carved.arrays("eval")["image"], whole.arrays("eval")["image"])
  with pytest.raises(ValueError, match="validation_fraction"):
    whole.arrays("validation")
  random_access = ImageDataset("cifar10", source="tfds", validation_fraction=0.1)
  for read in (random_access.example_source, random_access.arrays):
    with pytest.raises(SettingError, match="tfds_in_memory"):
      read("validation")
  for name in os.listdir(idx_dir):
    if name.startswith("t10k"):
      os.remove(os.path.join(idx_dir, name))
  bindings = tiny_fashion_bindings(idx_dir) + [
      "ImageDataset.validation_fraction = 0.25", "Experiment.train_epochs = 1"]
  model_dir = tmp_path / "run"
  out = run_experiment("train", model_dir, tf.distribute.get_strategy(), bindings,
                       ["configs/fashion_mnist_plain.gin"])
  record = json.loads((model_dir / "eval_results_validation.json").read_text())
  assert record["split"] == "validation" and record["step"] == out["experiment"].train_steps
  assert record["accuracy_worst_case"] <= record["accuracy"]
  assert record["train_seconds"] > 0
  assert not (model_dir / "eval_results.json").exists()



def test_a_replaying_methods_warm_up_ends_at_a_new_batch():
  """Free replays each batch m times: a start inside a batch's replays is
  moved to the next batch, so the method's first step is a batch's first
  delivery (its buffer starts there), not its third."""
  arrays = image_arrays(4 * B)
  default = tf.distribute.get_strategy()
  warm = build_trainer(lambda: tiny_cnn(0), FreeTraining(epsilon=EPS, replays=4),
                       global_batch_size=B, optimizer_fn=lambda: keras.optimizers.SGD(0.05),
                       split_batch=split, adversarial_start_step=6, input_shape=(B, H, H, 1))
  assert warm.adversarial_start_step == 8
  iterator = iter(distributed_dataset(default, arrays, B, shuffle=True, seed=5,
                                      repeats_per_batch=4))
  first = warm.train(iterator, 10)
  assert first["steps"] == 8 and first["adversarial"] == 0.0
  second = warm.train(iterator, 4)
  assert second["steps"] == 4 and second["adversarial"] == 1.0
  aligned = build_trainer(lambda: tiny_cnn(0), FreeTraining(epsilon=EPS, replays=4),
                          global_batch_size=B, split_batch=split, adversarial_start_step=8,
                          input_shape=(B, H, H, 1))
  assert aligned.adversarial_start_step == 8
