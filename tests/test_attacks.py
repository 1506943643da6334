"""Evaluation attacks against independent references: APGD against a line-by-line
port of Croce & Hein's `attack_single_run`, robust accuracy that implies clean
accuracy, and attack gradients under float16 loss scaling."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfadv.attacks import APGD, InputAttack, apgd_checkpoints
from tfadv.data.pipeline import distributed_dataset
from tfadv.experiment import build_trainer
from tfadv.methods import Plain

# --- a tanh network whose input gradient is written out by hand --------------


def _mlp(d=12, hidden=16, classes=4, seed=0):
  rng = np.random.RandomState(seed)
  w1, b1 = rng.randn(d, hidden) * 0.8, rng.randn(hidden) * 0.3
  w2, b2 = rng.randn(hidden, classes) * 1.2, rng.randn(classes) * 0.3
  inputs = keras.Input((d,))
  first, second = keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(classes)
  model = keras.Model(inputs, second(first(inputs)))
  first.set_weights([w1.astype(np.float32), b1.astype(np.float32)])
  second.set_weights([w2.astype(np.float32), b2.astype(np.float32)])
  return model, (w1, b1, w2, b2)


def _ce_and_gradient(params, x, y):
  """Per-example cross-entropy, ∂/∂x by the chain rule, and the logits (float64)."""
  w1, b1, w2, b2 = params
  h = np.tanh(x @ w1 + b1)
  z = h @ w2 + b2
  z = z - z.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  loss = -np.log(p[np.arange(len(y)), y])
  dz = p.copy()
  dz[np.arange(len(y)), y] -= 1.0
  dx = ((dz @ w2.T) * (1.0 - h ** 2)) @ w1.T
  return loss, dx, z


def apgd_port(params, x, y, t, eps, n_iter, norm, rho=0.75):
  """fra31/auto-attack `APGDAttack.attack_single_run` (ℓ∞/ℓ2, CE, one EOT
  sample), line by line in NumPy, from the same random draw t. Also returns
  the first misclassified iterate (tfadv returns that one; the reference
  keeps the last, and either is a valid adversarial example) and how often
  the step was halved and the iterate reset to a better best point."""
  n = len(x)
  col = lambda v: v[:, None]
  if norm == "linf":
    x_adv = x + eps * t / np.abs(t).max(1, keepdims=True)
  else:
    x_adv = x + eps * t / np.sqrt((t ** 2).sum(1, keepdims=True))
  x_adv = np.clip(x_adv, 0.0, 1.0)

  def l2_project(v):
    d = v - x
    norms = np.sqrt((d ** 2).sum(1, keepdims=True))
    return np.clip(x + d / (norms + 1e-12) * np.minimum(eps, norms), 0.0, 1.0)

  x_best, x_first_adv = x_adv.copy(), x_adv.copy()
  loss_steps = np.zeros([n_iter, n])
  loss, grad, z = _ce_and_gradient(params, x_adv, y)
  acc = z.argmax(1) == y
  loss_best, grad_best = loss.copy(), grad.copy()
  step = 2.0 * eps * np.ones(n)
  x_adv_old = x_adv.copy()
  n_iter_2, n_iter_min, size_decr = (max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1),
                                     max(int(0.03 * n_iter), 1))
  k, counter3 = n_iter_2, 0
  loss_best_last_check, reduced_last_check = loss_best.copy(), np.ones(n)
  halvings = resets = 0
  for i in range(n_iter):
    grad2 = x_adv - x_adv_old
    x_adv_old = x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    if norm == "linf":
      x1 = x_adv + col(step) * np.sign(grad)
      x1 = np.clip(np.minimum(np.maximum(x1, x - eps), x + eps), 0.0, 1.0)
      x1 = np.clip(np.minimum(np.maximum(x_adv + (x1 - x_adv) * a + grad2 * (1 - a),
                                         x - eps), x + eps), 0.0, 1.0)
    else:
      g_norm = np.sqrt((grad ** 2).sum(1, keepdims=True))
      x1 = l2_project(x_adv + col(step) * grad / (g_norm + 1e-12))
      x1 = l2_project(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))
    x_adv = x1
    loss, grad, z = _ce_and_gradient(params, x_adv, y)
    pred = z.argmax(1) == y
    first = np.logical_and(acc, ~pred)
    x_first_adv[first] = x_adv[first]
    acc = np.logical_and(acc, pred)
    loss_steps[i] = loss
    ind = loss > loss_best
    x_best[ind], grad_best[ind], loss_best[ind] = x_adv[ind], grad[ind], loss[ind]
    counter3 += 1
    if counter3 == k:
      t_count = np.zeros(n)
      for c in range(k):  # index −1 reads the last (unwritten, zero) row, as in torch
        t_count += loss_steps[i - c] > loss_steps[i - c - 1]
      oscillation = (t_count <= k * rho).astype(np.float64)
      no_improvement = (1.0 - reduced_last_check) * (loss_best_last_check >= loss_best)
      oscillation = np.maximum(oscillation, no_improvement)
      reduced_last_check, loss_best_last_check = oscillation.copy(), loss_best.copy()
      fl = oscillation > 0
      step[fl] /= 2.0
      halvings += int(fl.sum())
      resets += int(np.any(x_adv[fl] != x_best[fl], axis=1).sum())
      x_adv[fl], grad[fl] = x_best[fl], grad_best[fl]
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return x_best, acc, loss_best, x_first_adv, halvings, resets


def _case(norm, n=64, d=12):
  model, params = _mlp(d)
  rng = np.random.RandomState(1)
  x = rng.uniform(0.05, 0.95, (n, d)).astype(np.float32)
  clean = _ce_and_gradient(params, x.astype(np.float64), np.zeros(n, int))[2].argmax(1)
  y = clean.copy()
  y[:4] = (clean[:4] + 1) % 4  # four examples misclassified clean
  eps = 0.05 if norm == "linf" else 0.15
  # Short runs: checks come every 1-2 iterations (hundreds of halvings), and
  # float32 (tfadv) and float64 (the port) agree to the last iterate; over
  # longer ℓ2 runs near-ties between losses make the two drift apart.
  n_iter = 10 if norm == "linf" else 7
  return model, params, x, y.astype(np.int32), eps, n_iter


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_matches_a_line_by_line_port_of_the_reference(norm):
  model, params, x, y, eps, n_iter = _case(norm)
  # The same draw the attack makes first from a generator of the same seed.
  draw = tf.random.Generator.from_seed(3)
  t = (draw.uniform(x.shape, -1.0, 1.0) if norm == "linf" else draw.normal(x.shape)).numpy()
  x_best, acc, _, x_first_adv, halvings, resets = apgd_port(
      params, x.astype(np.float64), y, t.astype(np.float64), eps, n_iter, norm)
  # The reference's robust flags start from clean accuracy (`perturb`).
  clean_correct = _ce_and_gradient(params, x.astype(np.float64), y)[2].argmax(1) == y
  robust = np.logical_and(acc, clean_correct)
  assert halvings > 10 and resets > 3  # the checks and restarts are exercised
  assert 0.2 < robust.mean() < 0.8

  x_adv = APGD(epsilon=eps, num_steps=n_iter, norm=norm)(
      model, tf.constant(x), tf.constant(y), rng=tf.random.Generator.from_seed(3)).numpy()
  want = np.where(robust[:, None], x_best, x_first_adv)
  want[~clean_correct] = x[~clean_correct]  # misclassified clean: the clean input
  np.testing.assert_allclose(x_adv, want, atol=2e-5)
  held = model(x_adv).numpy().argmax(1) == y
  np.testing.assert_array_equal(held, robust)


def test_apgd_step_size_schedule_is_the_references():
  # ℓ2 and ℓ∞ both start at step 2ε, checked on one step of a linear model
  # (no momentum on the first step, no check before iteration ⌊0.22·N⌋).
  x = tf.constant([[0.5, 0.5, 0.5, 0.5]])
  inputs = keras.Input((4,))
  layer = keras.layers.Dense(3)
  model = keras.Model(inputs, layer(inputs))
  layer.set_weights([np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32),
                     np.array([5.0, 0.0, 0.0], np.float32)])
  for norm in ("linf", "l2"):
    eps = 0.1
    draw = tf.random.Generator.from_seed(0)
    t = (draw.uniform(x.shape, -1.0, 1.0) if norm == "linf" else draw.normal(x.shape)).numpy()
    x_adv = APGD(epsilon=eps, num_steps=1, norm=norm)(
        model, x, tf.constant([0]), rng=tf.random.Generator.from_seed(0)).numpy()
    start = x.numpy() + eps * t / (np.abs(t).max() if norm == "linf" else np.linalg.norm(t))
    # CE's input gradient here is (p − e_y)·Wᵀ: down on pixel 0, up on 1 and 2, 0 on 3.
    z = start @ layer.get_weights()[0] + layer.get_weights()[1]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    g = (p - np.eye(3)[0]) @ layer.get_weights()[0].T
    if norm == "linf":
      moved = np.clip(start + 2 * eps * np.sign(g), x.numpy() - eps, x.numpy() + eps)
    else:
      moved = start + 2 * eps * g / np.linalg.norm(g)
      d = moved - x.numpy()
      moved = x.numpy() + d * min(1.0, eps / np.linalg.norm(d))
    loss = lambda v: -np.log(np.exp(v - v.max())[0, 0] / np.exp(v - v.max()).sum())
    z_moved = moved @ layer.get_weights()[0] + layer.get_weights()[1]
    want = moved if loss(z_moved) > loss(z) else start
    np.testing.assert_allclose(x_adv, want, atol=1e-6, err_msg=norm)


def test_apgd_checkpoints_are_the_references_counter():
  # The reference's counter, written out: k = n_iter_2, checked when counter3 == k.
  for n_iter in (5, 30, 100):
    k, counter, want = max(int(0.22 * n_iter), 1), 0, {}
    for i in range(n_iter):
      counter += 1
      if counter == k:
        want[i] = k
        k, counter = max(k - max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)), 0
    assert apgd_checkpoints(n_iter) == want


# --- robust implies clean-correct -------------------------------------------------


def _identity_model():
  inputs = keras.Input((2,))
  layer = keras.layers.Dense(2)
  model = keras.Model(inputs, layer(inputs))
  layer.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
  return model


def test_apgd_never_counts_a_clean_misclassified_example_as_robust():
  # logits = x; example 0 is misclassified clean (0.49 < 0.51) but most of its
  # ε-ball is classified correctly: the random start and the iterate may land
  # there. It must still count as broken, and its image be the clean input.
  model = _identity_model()
  x = tf.constant([[0.49, 0.51], [0.9, 0.1]])
  y = tf.constant([0, 0])
  for seed in range(5):
    x_adv = APGD(epsilon=0.3, num_steps=1)(model, x, y,
                                           rng=tf.random.Generator.from_seed(seed)).numpy()
    np.testing.assert_array_equal(x_adv[0], x.numpy()[0])  # the clean, misclassified input
    assert model(x_adv).numpy().argmax(1)[0] != 0


class _Repairing:
  """An attack that moves every example to the correct class's corner."""

  def adversarial_logits(self, model, inputs, labels, rng, loss_fn):
    return model(tf.one_hot(labels, 2), training=False)


class _Identity:
  def adversarial_logits(self, model, inputs, labels, rng, loss_fn):
    return model(inputs, training=False)


def _evaluate_one_batch(model_fn, images, labels, attacks, steps=1):
  """`Trainer.evaluate` of `steps` batches of 4 (the last padded with weight 0)
  under `attacks`."""
  trainer = build_trainer(model_fn, Plain(), global_batch_size=4,
                          optimizer_fn=lambda: keras.optimizers.SGD(0.0),
                          split_batch=lambda b: (b["image"], b["label"]), eval_attacks=attacks)
  ds = distributed_dataset(tf.distribute.get_strategy(), {"image": images, "label": labels}, 4,
                           shuffle=False)
  return trainer.evaluate(iter(ds), steps)


def test_robust_accuracy_ands_with_clean_correctness_per_example():
  images = np.array([[0.2, 0.8], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]], np.float32)
  labels = np.array([0, 0, 1, 1], np.int32)  # examples 1 and 3 right clean
  metrics = _evaluate_one_batch(_identity_model, images, labels,
                                {"repair": _Repairing(), "none": _Identity()})
  assert metrics["accuracy"] == 0.5
  # The repairing attack leaves all four correctly classified, but only the
  # two clean-correct ones count as robust.
  assert metrics["accuracy_repair"] == 0.5
  assert metrics["accuracy_none"] == 0.5
  assert metrics["accuracy_worst_case"] == 0.5


class _ConstantAttack:
  """Every example's adversarial logits are (0, 1): class 1 wins. Its
  per-example values are read off the inputs (so the zero-weight padding row,
  a copy of example 0, has example 0's). It does not say `predicts_alone`: an
  attack that does not is an attack (the default), not a defence's prediction."""

  per_example_metrics = {"changed": "successful", "queries": "attacked", "cost": "all"}

  def adversarial_outputs(self, model, inputs, labels, rng, loss_fn):
    logits = tf.tile(tf.constant([[0.0, 1.0]]), [tf.shape(inputs)[0], 1])
    return logits, {"changed": 10.0 * inputs[:, 0], "queries": 100.0 * inputs[:, 1],
                    "cost": 10.0 * inputs[:, 1]}


class _AloneAttack(_ConstantAttack):
  """A defence's own prediction (as smoothing's): counted whatever the clean
  prediction was."""

  predicts_alone = True
  per_example_metrics = {"certified": "all"}

  def adversarial_outputs(self, model, inputs, labels, rng, loss_fn):
    logits, _ = super().adversarial_outputs(model, inputs, labels, rng, loss_fn)
    return logits, {"certified": tf.cast(inputs[:, 0] > 0.5, tf.float32)}


def test_evaluation_accounting_matches_a_hand_count_with_padding_dropout_and_attack_metrics():
  # logits = x behind a dropout layer (evaluation must not drop); 3 examples
  # in a batch of 4, so one padding row of weight 0 (example 0 again).
  #   example 0: (0.9, 0.1), label 0: right clean, broken by the attack
  #   example 1: (0.2, 0.8), label 1: right clean, holds
  #   example 2: (0.7, 0.3), label 1: wrong clean; the attack "repairs" it
  def model_fn():
    inputs = keras.Input((2,))
    layer = keras.layers.Dense(2)
    model = keras.Model(inputs, layer(keras.layers.Dropout(0.5)(inputs)))
    layer.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return model

  images = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], np.float32)
  labels = np.array([0, 1, 1], np.int32)
  metrics = _evaluate_one_batch(model_fn, images, labels,
                                {"sub": _ConstantAttack(), "alone": _AloneAttack()})
  # By hand: cross-entropy of 2 logits is log(1 + e^(other − true)).
  loss = (np.log1p(np.exp(-0.8)) + np.log1p(np.exp(-0.6)) + np.log1p(np.exp(0.4))) / 3
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  assert metrics["examples"] == 3.0
  np.testing.assert_allclose(metrics["accuracy"], 2 / 3)
  np.testing.assert_allclose(metrics["accuracy_sub"], 1 / 3)  # example 1 only
  assert metrics["success_rate_sub"] == 0.5  # 1 broken (0) of 2 attacked (0, 1)
  assert metrics["sub_changed"] == 9.0  # over the broken: example 0's 10 × 0.9
  np.testing.assert_allclose(metrics["sub_queries"], 45.0)  # over the attacked: (10 + 80) / 2
  np.testing.assert_allclose(metrics["sub_cost"], 4.0)  # over all 3: (1 + 8 + 3) / 3
  np.testing.assert_allclose(metrics["accuracy_alone"], 2 / 3)  # examples 1 and 2
  np.testing.assert_allclose(metrics["alone_certified"], 2 / 3)  # examples 0 and 2
  assert "success_rate_alone" not in metrics
  # A worst case needs two attacks that are not a defence's own prediction.
  assert "accuracy_worst_case" not in metrics


def test_evaluation_of_one_example_and_of_several_batches_counts_by_hand():
  # One example, (0.9, 0.1) of class 0, in a batch of 4 (3 padding rows of
  # weight 0): every mean is over 1, not over a floor of the count. The
  # attack breaks it: 1 of 1 attacked.
  metrics = _evaluate_one_batch(_identity_model, np.array([[0.9, 0.1]], np.float32),
                                np.array([0], np.int32), {"sub": _ConstantAttack()})
  assert metrics["examples"] == 1.0
  np.testing.assert_allclose(metrics["loss"], np.log1p(np.exp(-0.8)), rtol=1e-6)
  assert metrics["accuracy"] == 1.0 and metrics["accuracy_sub"] == 0.0
  assert metrics["success_rate_sub"] == 1.0
  np.testing.assert_allclose(metrics["sub_changed"], 9.0)  # 10 × 0.9 over the 1 broken
  # 10 examples over 3 batches of 4 (the last padded by 2): every batch counts.
  images = np.array([[0.9, 0.1] if i % 2 == 0 else [0.2, 0.8] for i in range(10)], np.float32)
  labels = np.array([0] * 7 + [1] * 3, np.int32)  # right: 0, 2, 4, 6 (class 0), 7, 9 (class 1)
  metrics = _evaluate_one_batch(_identity_model, images, labels, {}, steps=3)
  assert metrics["examples"] == 10.0
  np.testing.assert_allclose(metrics["accuracy"], 6 / 10)


# --- float16 evaluation -------------------------------------------------------------


@pytest.mark.slow
def test_evaluation_attacks_take_loss_scaled_gradients_under_float16():
  # logits = 30·x: example (0.9, 0.2) of class 0 has p(other) ≈ e^−21 ≈ 8e−10,
  # below float16's smallest subnormal (6e−8), so its unscaled input gradient
  # is exactly zero and FGSM would not move. With the loss scale (2^15) pixel 1
  # rises by ε = 0.8 (pixel 0's gradient is 0: p(true) rounds to 1) and the
  # example breaks (0.9 < 1.0).
  def model_fn():
    inputs = keras.Input((2,))
    layer = keras.layers.Dense(2)
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([30.0 * np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return model

  images = np.array([[0.9, 0.2]] * 4, np.float32)
  labels = np.zeros(4, np.int32)
  fgsm = InputAttack(epsilon=0.8, num_steps=1)
  try:
    strategy = tf.distribute.get_strategy()
    trainer = build_trainer(model_fn, Plain(), global_batch_size=4,
                            optimizer_fn=lambda: keras.optimizers.SGD(0.0),
                            mixed_precision="mixed_float16",
                            split_batch=lambda b: (b["image"], b["label"]),
                            eval_attacks={"fgsm": fgsm})
    model = trainer.model
    # The unscaled float16 gradient underflows: exactly zero.
    x = tf.constant(images)
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = tf.cast(model(x), tf.float32)
      loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True))
    assert np.all(tape.gradient(loss, x).numpy() == 0.0)
    ds = distributed_dataset(strategy, {"image": images, "label": labels}, 4, shuffle=False)
    metrics = trainer.evaluate(iter(ds), 1)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert metrics["accuracy"] == 1.0
  assert metrics["accuracy_fgsm"] == 0.0


# --- input attacks: the projection's defaults and the random start ------------------


def test_project_defaults_to_the_unit_pixel_range():
  from tfadv.attacks import project  # pylint: disable=g-import-not-at-top
  x = tf.constant([[0.05, 0.5, 0.95]])
  x_adv = tf.constant([[-0.5, 0.9, 1.5]])
  np.testing.assert_allclose(project(x_adv, x, 0.1, "linf").numpy(), [[0.0, 0.6, 1.0]])
  # ℓ2: onto the ball of radius 0.1 around x, then into [0, 1].
  d = np.array([-0.55, 0.4, 0.55])
  want = np.clip(x.numpy() + d * 0.1 / np.linalg.norm(d), 0.0, 1.0)
  np.testing.assert_allclose(project(x_adv, x, 0.1, "l2").numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_the_documented_draw_around_x(norm):
  # A zero step leaves the start: x + U(−ε, ε) (ℓ∞), or x + ε·U(0, 1)·z/‖z‖₂
  # with z Gaussian (ℓ2, Madry's start), clipped to [0, 1], from the
  # generator's first draws.
  x = tf.constant(np.random.RandomState(0).uniform(0.2, 0.8, (4, 6)).astype(np.float32))
  y = tf.zeros([4], tf.int32)
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
  attack = InputAttack(epsilon=0.1, step_size=0.0, num_steps=1, norm=norm, random_start=True)
  got = attack(model, x, y, rng=tf.random.Generator.from_seed(7)).numpy()
  draw = tf.random.Generator.from_seed(7)
  if norm == "linf":
    delta = draw.uniform(x.shape, -0.1, 0.1).numpy()
  else:
    z = draw.normal(x.shape).numpy()
    u = draw.uniform([4, 1]).numpy()
    delta = 0.1 * u * z / np.linalg.norm(z, axis=1, keepdims=True)
  np.testing.assert_allclose(got, np.clip(x.numpy() + delta, 0, 1), rtol=1e-5, atol=1e-7)


# --- input attacks: inference mode, restarts, arguments -----------------------------


def _dropout_identity(bias=(0.0, 0.1)):
  """logits = Dropout(0.999)(x) + bias: in inference the input decides the
  class; in training mode almost every input entry is dropped and class 1 wins."""
  inputs = keras.Input((2,))
  layer = keras.layers.Dense(2)
  model = keras.Model(inputs, layer(keras.layers.Dropout(0.999, seed=1)(inputs)))
  layer.set_weights([np.eye(2, dtype=np.float32), np.array(bias, np.float32)])
  return model


def test_attacks_score_and_choose_their_images_in_inference_mode():
  model = _dropout_identity()
  x = tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # 3 examples, 2 classes
  y = tf.constant([0, 0, 1])
  # adversarial_logits: the model in inference mode on the attack's images.
  attack = InputAttack(epsilon=0.0, num_steps=1)
  logits = attack.adversarial_logits(model, x, y, None, None).numpy()
  np.testing.assert_allclose(logits, model(x, training=False).numpy())
  # Restarts keep, per example, the first run that breaks it, judged in
  # inference mode: run 1 breaks example 0 only, run 2 example 1 only.
  runs = iter([tf.constant([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
               tf.constant([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])])

  class Scripted(InputAttack):
    def _one_run(self, *args):
      return next(runs)

  x_adv = Scripted(epsilon=1.0, restarts=2, random_start=True)(
      model, x, y, rng=tf.random.Generator.from_seed(0)).numpy()
  np.testing.assert_array_equal(x_adv, [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])


def test_input_attack_defaults_and_argument_checks():
  assert InputAttack().get_config() == {
      "epsilon": 0.1, "step_size": 0.1, "num_steps": 1, "norm": "linf",
      "random_start": False, "restarts": 1, "clip_min": 0.0, "clip_max": 1.0,
      "training": False}
  for bad in (dict(num_steps=0), dict(restarts=0), dict(norm="l1")):
    with pytest.raises(ValueError, match="InputAttack"):
      InputAttack(**bad)
  model = _identity_model()
  x, y = tf.constant([[0.6, 0.4]]), tf.constant([0])
  # Random starts and restarts draw from the caller's generator: none, an error.
  for needs_rng in (dict(random_start=True), dict(restarts=2)):
    with pytest.raises(ValueError, match="rng"):
      InputAttack(epsilon=0.1, **needs_rng)(model, x, y)
  InputAttack(epsilon=0.1)(model, x, y)  # FGSM from x needs none


def test_apgd_runs_in_inference_mode_and_checks_its_arguments():
  # Dropout in the model must not act: APGD on it equals APGD on the same
  # weights without the dropout layer.
  x = tf.constant([[0.55, 0.45], [0.7, 0.3], [0.35, 0.65]])
  y = tf.constant([0, 0, 1])
  with_dropout = APGD(epsilon=0.1, num_steps=5)(
      _dropout_identity(bias=(0.0, 0.0)), x, y, rng=tf.random.Generator.from_seed(0)).numpy()
  without = APGD(epsilon=0.1, num_steps=5)(
      _identity_model(), x, y, rng=tf.random.Generator.from_seed(0)).numpy()
  np.testing.assert_allclose(with_dropout, without, atol=1e-7)
  assert APGD().get_config() == {"epsilon": 0.1, "num_steps": 100, "loss": "ce", "norm": "linf",
                                 "restarts": 1, "rho": 0.75, "clip_min": 0.0, "clip_max": 1.0}
  for bad in (dict(num_steps=0), dict(restarts=0), dict(norm="l1"), dict(loss="cw")):
    with pytest.raises(ValueError, match="APGD"):
      APGD(**bad)
  with pytest.raises(ValueError, match="rng"):
    APGD()(_identity_model(), x, y)


# --- APGD's step-size checks and restarts, on scripted losses -------------------------


def reference_halvings(losses, n_iter, rho=0.75):
  """How often `attack_single_run` halves one example's step, given the loss at
  the start (losses[0]) and after each iteration: the reference's checkpoint
  rules written out (oscillation: increases over the last k iterations ≤ k·ρ,
  an unwritten row reading as 0; or no improvement of the best loss since a
  check that did not halve)."""
  loss_steps = np.zeros(n_iter)
  best = losses[0]
  k, counter, halvings = max(int(0.22 * n_iter), 1), 0, 0
  best_last_check, reduced_last_check = best, 1.0
  for i in range(n_iter):
    loss_steps[i] = losses[i + 1]
    best = max(best, losses[i + 1])
    counter += 1
    if counter == k:
      increases = sum(loss_steps[i - c] > loss_steps[i - c - 1] for c in range(k))
      oscillation = float(increases <= k * rho)
      halve = max(oscillation, (1 - reduced_last_check) * float(best_last_check >= best))
      reduced_last_check, best_last_check = halve, best
      halvings += int(halve)
      k, counter = max(k - max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)), 0
  return halvings


class _ScriptedLosses:
  """A 'model' whose cross-entropy on class 0 at its n-th call is scripted:
  logits (a, 0) with log(1 + e^−a) = the scripted loss; the logits do not
  depend on x (zero input gradient)."""

  def __init__(self, losses):  # losses: calls × batch
    a = -np.log(np.expm1(np.asarray(losses, np.float64)))
    self.table = tf.constant(np.stack([a, np.zeros_like(a)], -1), tf.float32)
    self.calls = tf.Variable(0)

  def __call__(self, x, training=False):
    logits = tf.gather(self.table, self.calls) + 0.0 * tf.reduce_sum(x, 1, keepdims=True)
    self.calls.assign_add(1)
    return logits


def test_apgd_step_checks_follow_the_reference_on_scripted_losses():
  # Sequences (start, then 19 iterations) on which the reference's rules and
  # each near miss (≥ for >, < for ≤ in the oscillation count, > for ≥ in the
  # no-progress test) disagree; ties included.
  sequences = np.array([
      [1, 4, 2, 1, 4, 4, 4, 4, 2, 4, 2, 3, 1, 4, 3, 1, 1, 1, 3, 2],
      [3, 4, 4, 3, 1, 2, 2, 2, 2, 1, 2, 1, 4, 1, 4, 2, 3, 4, 4, 1],
      [3, 4, 1, 2, 4, 2, 4, 4, 3, 4, 1, 2, 2, 2, 4, 1, 4, 3, 1, 4]], np.float64)
  n_iter, eps = 19, 0.1
  # Call 0 is the clean input; call 1 the start; call i + 2 iteration i.
  table = np.concatenate([np.ones((1, 3)), sequences.T], 0)
  attack = APGD(epsilon=eps, num_steps=n_iter)
  x = tf.fill([3, 4], 0.5)
  _, _, step = attack._one_run(_ScriptedLosses(table), x, tf.zeros([3], tf.int32),  # pylint: disable=protected-access
                               tf.random.Generator.from_seed(0))
  want = [2 * eps / 2 ** reference_halvings(s, n_iter) for s in sequences]
  np.testing.assert_allclose(step.numpy(), want, rtol=1e-6)
  assert len(set(want)) > 1


def test_apgd_restarts_keep_each_examples_first_breaking_run():
  # Three runs drawn from one generator in turn: restarts=3 must give, per
  # example, the image of the first run that broke it, else the last run's.
  model, _, x, y, _, _ = _case("linf")
  eps, steps = 0.3, 1  # short runs: the random start decides which examples break
  rng = tf.random.Generator.from_seed(5)
  images, broken = [], []
  for _ in range(3):
    images.append(APGD(epsilon=eps, num_steps=steps)(
        model, tf.constant(x), tf.constant(y), rng=rng).numpy())
    broken.append(model(images[-1]).numpy().argmax(1) != y)
  # Each of the first two runs breaks examples the other does not.
  assert np.any(broken[1] & ~broken[0]) and np.any(broken[0] & ~broken[1])
  want = np.where(broken[0][:, None], images[0],
                  np.where(broken[1][:, None], images[1], images[2]))
  got = APGD(epsilon=eps, num_steps=steps, restarts=3)(
      model, tf.constant(x), tf.constant(y), rng=tf.random.Generator.from_seed(5)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_embedding_attack_defaults():
  from tfadv.attacks import EmbeddingOutputAttack  # pylint: disable=g-import-not-at-top
  assert EmbeddingOutputAttack().get_config() == {
      "epsilon": 1.0, "step_size": 0.5, "num_steps": 5, "random_start": True,
      "layer_name": "token_embedding", "padding_mask_key": "padding_mask"}
  with pytest.raises(ValueError, match="num_steps"):
    EmbeddingOutputAttack(num_steps=0)


class _TiedLosses:
  """64 classes, label 0 always on top: logits 1 + 1e-10·Σx for class 0 and
  1 − d for the others, with log(1 + 63·e^−d) the scripted loss of the call.
  The 1e-10·Σx term is below float32's resolution at 1, so the loss is
  exactly the scripted one wherever x is, while the input gradient is not
  zero (−(1 − p₀)·1e-10 per pixel): the iterates move and losses tie exactly."""

  def __init__(self, losses):  # losses: calls × batch
    d = np.log(63.0 / np.expm1(np.asarray(losses, np.float64)))
    self.table = tf.constant(d, tf.float32)
    self.calls = tf.Variable(0)

  def __call__(self, x, training=False):
    d = tf.gather(self.table, self.calls)[:, None]
    first = 1.0 + 1e-10 * tf.reduce_sum(x, 1, keepdims=True)
    self.calls.assign_add(1)
    return tf.concat([first, tf.ones([tf.shape(x)[0], 63]) - d], 1)


def test_apgd_keeps_the_first_of_tied_best_losses_as_the_reference_does():
  # The start and the first iterate tie at the highest loss of the run; the
  # reference keeps a new best only if strictly higher (`y1 > loss_best`), so
  # the best point, returned for an unbroken example, is the start.
  n_iter, eps = 6, 0.1
  losses = np.array([3.0, 3.0, 1.0, 2.0, 1.0, 2.0, 1.0])  # start, then 6 iterations
  table = np.concatenate([[1.0], losses])[:, None]  # call 0: the clean input
  x = tf.fill([1, 4], 0.5)
  got = APGD(epsilon=eps, num_steps=n_iter)(_TiedLosses(table), x, tf.zeros([1], tf.int32),
                                             rng=tf.random.Generator.from_seed(0)).numpy()
  t = tf.random.Generator.from_seed(0).uniform([1, 4], -1.0, 1.0).numpy()
  start = np.clip(0.5 + eps * t / np.abs(t).max(), 0, 1)
  np.testing.assert_allclose(got, start, atol=1e-7)
  assert not np.allclose(start, 0.5 - eps)  # the first iterate (x − ε) is elsewhere
