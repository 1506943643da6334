"""Embedding-matrix FGM and gradient penalty: references, exactness, distribution, XLA."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfadv.data.pipeline import WEIGHTS, distributed_dataset
from tfadv.experiment import sparse_cross_entropy
from tfadv.methods import EmbeddingFGM, EmbeddingGradientPenalty, Plain
from tfadv.methods.embedding import combine_rows
from tfadv.trainer import Trainer

B, L, V, C = 4, 8, 40, 3


def tiny_bert(seed=0):
  keras.utils.set_random_seed(seed)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=V, num_layers=1, num_heads=2, hidden_dim=16,
      intermediate_dim=32, dropout=0.0, max_sequence_length=L)
  return keras_hub.models.BertTextClassifier(backbone, num_classes=C, dropout=0.0)


def tiny_mlp(dtype="float64", seed=0):
  """Embedding -> flatten -> tanh -> logits, small enough for finite differences."""
  keras.utils.set_random_seed(seed)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  x = keras.layers.Embedding(V, 4, name="token_embedding", dtype=dtype,
                             embeddings_initializer=keras.initializers.RandomNormal(stddev=0.5))(ids)
  x = keras.layers.Flatten(dtype=dtype)(x)
  x = keras.layers.Dense(6, activation="tanh", dtype=dtype)(x)
  return keras.Model({"token_ids": ids}, keras.layers.Dense(C, dtype=dtype)(x))


def batch_arrays(n=B, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, V, size=(n, L)).astype(np.int32)
  ids[:, 0] = 2
  ids[0, 3:5] = ids[0, 1]  # repeated tokens: duplicate gradient rows
  mask = np.ones((n, L), bool)
  mask[1, 6:] = False
  return {"token_ids": ids, "segment_ids": np.zeros((n, L), np.int32),
          "padding_mask": mask, "label": rng.randint(0, C, n).astype(np.int32)}


def split(batch):
  return {k: batch[k] for k in ("token_ids", "segment_ids", "padding_mask")}, batch["label"]


def loss_fn(global_batch=B):
  def fn(labels, logits, weights):
    per = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_sum(per * tf.cast(weights, per.dtype)) / global_batch
  return fn


def dense(g):
  return tf.convert_to_tensor(g).numpy()


def eager_grads(model, inputs, labels, weights, fn):
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), weights)
  return loss, [dense(g) for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("form", ["adversarial", "clean_plus_adversarial"])
@pytest.mark.parametrize("norm", ["l2", "sign"])
def test_fgm_equals_hand_computed_two_pass_update(form, norm):
  model = tiny_bert()
  arrays = batch_arrays()
  inputs, labels = split(arrays)
  weights = tf.ones([B])
  fn = loss_fn()
  method = EmbeddingFGM(epsilon=0.3, norm=norm, form=form, adversarial_weight=0.5)
  method.build(model)
  out = method.compute_gradients(model, fn, inputs, labels, weights)

  # Reference: plain eager passes, perturbing the variable itself.
  table = model.backbone.token_embedding.embeddings
  position = [i for i, v in enumerate(model.trainable_variables) if v is table][0]
  _, clean = eager_grads(model, inputs, labels, weights, fn)
  g = clean[position]
  delta = 0.3 * np.sign(g) if norm == "sign" else 0.3 * g / np.linalg.norm(g)
  # Only rows of tokens in the batch move.
  assert set(np.nonzero(np.abs(delta).sum(1))[0]) <= set(arrays["token_ids"].ravel())
  original = table.numpy()
  table.assign(original + delta)
  _, adv = eager_grads(model, inputs, labels, weights, fn)
  table.assign(original)
  expected = adv if form == "adversarial" else [c + 0.5 * a for c, a in zip(clean, adv)]
  for got, want in zip(out.gradients, expected):
    np.testing.assert_allclose(dense(got), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(out.metrics["delta_norm"]), np.linalg.norm(delta), rtol=1e-5)


def test_combine_rows_sums_duplicates_without_dense_table():
  g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                       tf.constant([7, 2, 7]), tf.constant([10, 2]))
  indices, rows = combine_rows(g)
  assert rows.shape == (3, 2)  # one slot per occurrence, never 10 x 2
  got = {int(i): r.tolist() for i, r in zip(indices.numpy(), rows.numpy()) if r.any()}
  assert got == {2: [3.0, 4.0], 7: [6.0, 8.0]}


def _trainer(strategy, model_fn, method, optimizer_fn, jit=False, global_batch=B):
  with strategy.scope():
    model = model_fn()
    optimizer = optimizer_fn()
    optimizer.build(model.trainable_variables)
    method.build(model)
  return Trainer(strategy, model, optimizer, method, split_batch=split,
                 per_example_loss=sparse_cross_entropy,
                 global_batch_size=global_batch, jit_compile=jit)


def _train(trainer, arrays, steps, global_batch=B):
  ds = distributed_dataset(trainer.strategy, arrays, global_batch, shuffle=True, seed=3)
  return trainer.train(iter(ds), steps)


def test_fgm_step_leaves_no_float_drift():
  arrays = batch_arrays()
  # A zero learning rate makes the optimizer's update exactly zero, so any
  # trace of Δ left behind would show as a changed bit.
  trainer = _trainer(tf.distribute.get_strategy(), tiny_bert, EmbeddingFGM(epsilon=0.7),
                     lambda: keras.optimizers.SGD(learning_rate=0.0))
  table = trainer.model.backbone.token_embedding.embeddings
  before = table.numpy()
  metrics = _train(trainer, arrays, 2)
  assert metrics["delta_norm"] == pytest.approx(0.7, rel=1e-5)
  np.testing.assert_array_equal(table.numpy(), before)  # bit for bit
  # Adding and then subtracting Δ in the variable would not have been exact:
  delta = 0.7 * np.random.RandomState(0).randn(*before.shape).astype(np.float32)
  assert np.any((before + delta) - delta != before)

  # With a real step, E moves by the optimizer's update of the FGM gradient.
  trainer = _trainer(tf.distribute.get_strategy(), tiny_bert, EmbeddingFGM(epsilon=0.7),
                     lambda: keras.optimizers.SGD(learning_rate=0.1))
  table = trainer.model.backbone.token_embedding.embeddings
  before = table.numpy()
  batch = next(iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=True, seed=3)))
  out = trainer.method.compute_gradients(trainer.model, trainer._loss_fn, *split(batch),
                                         batch[WEIGHTS])
  position = [i for i, v in enumerate(trainer.model.trainable_variables) if v is table][0]
  expected = before - 0.1 * dense(out.gradients[position])
  _train(trainer, arrays, 1)
  # Graph and eager gradients may differ in the last bit of a summation.
  np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method_fn", [
    lambda: EmbeddingFGM(epsilon=0.5),
    lambda: EmbeddingFGM(epsilon=0.5, norm="sign", form="clean_plus_adversarial")])
def test_fgm_two_replicas_equal_one_device(method_fn, mirrored):
  arrays = batch_arrays(n=16)
  make_opt = lambda: keras.optimizers.Adam(1e-2)
  one = _trainer(tf.distribute.get_strategy(), tiny_bert, method_fn(), make_opt, global_batch=8)
  two = _trainer(mirrored, tiny_bert, method_fn(), make_opt, global_batch=8)
  m1 = _train(one, arrays, 3, global_batch=8)
  m2 = _train(two, arrays, 3, global_batch=8)
  for a, b in zip(one.model.trainable_variables, two.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(m1["adv_loss"], m2["adv_loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["delta_norm"], m2["delta_norm"], rtol=1e-5)


@pytest.mark.parametrize("method_fn", [
    Plain, lambda: EmbeddingFGM(epsilon=0.5),
    lambda: EmbeddingFGM(epsilon=0.5, form="clean_plus_adversarial"),
    lambda: EmbeddingGradientPenalty(epsilon=0.5),
    lambda: EmbeddingGradientPenalty(epsilon=0.5, variant="norm")])
def test_methods_compile_with_xla(method_fn):
  arrays = batch_arrays()
  make_opt = lambda: keras.optimizers.Adam(1e-2)
  plain = _trainer(tf.distribute.get_strategy(), tiny_bert, method_fn(), make_opt)
  jitted = _trainer(tf.distribute.get_strategy(), tiny_bert, method_fn(), make_opt, jit=True)
  batch = next(iter(distributed_dataset(jitted.strategy, arrays, B, shuffle=True, seed=3)))
  assert "HloModule" in jitted._replica_train.experimental_get_compiler_ir(batch)(stage="hlo")
  m1, m2 = _train(plain, arrays, 2), _train(jitted, arrays, 2)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-4)
  for a, b in zip(plain.model.trainable_variables, jitted.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)


def _penalised_objective(model, inputs, labels, epsilon, variant):
  fn = loss_fn()
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs), tf.ones([B], tf.float64))
  g = dense(tape.gradient(loss, model.get_layer("token_embedding").embeddings))
  sq = float(np.sum(g * g))
  return float(loss) + (0.5 * epsilon * sq if variant == "squared" else epsilon * np.sqrt(sq))


@pytest.mark.parametrize("variant", ["squared", "norm"])
def test_gradient_penalty_matches_central_differences(variant):
  model = tiny_mlp()
  arrays = batch_arrays()
  inputs, labels = {"token_ids": arrays["token_ids"]}, arrays["label"]
  method = EmbeddingGradientPenalty(epsilon=0.8, variant=variant)
  method.build(model)
  out = method.compute_gradients(model, loss_fn(), inputs, labels, tf.ones([B], tf.float64))
  rng = np.random.RandomState(1)
  h = 1e-6
  for var, grad in zip(model.trainable_variables, out.gradients):
    grad = dense(grad)
    flat = var.numpy().ravel()
    candidates = np.nonzero(grad.ravel())[0] if grad.any() else np.arange(flat.size)
    for k in rng.choice(candidates, size=min(3, candidates.size), replace=False):
      values = []
      for sign in (1, -1):
        shifted = flat.copy()
        shifted[k] += sign * h
        var.assign(shifted.reshape(var.shape))
        values.append(_penalised_objective(model, inputs, labels, 0.8, variant))
      var.assign(flat.reshape(var.shape))
      numeric = (values[0] - values[1]) / (2 * h)
      np.testing.assert_allclose(grad.ravel()[k], numeric, rtol=1e-5, atol=1e-8,
                                 err_msg=f"{var.path}[{k}]")


def test_fgm_and_gradient_penalty_agree_to_first_order():
  # ∇θ L(E + ε ĝ) = ∇θ [L + ε‖g‖] + O(ε²) with ĝ = g/‖g‖ held fixed.
  model = tiny_mlp()
  arrays = batch_arrays()
  inputs, labels = {"token_ids": arrays["token_ids"]}, arrays["label"]
  weights = tf.ones([B], tf.float64)
  plain = Plain().compute_gradients(model, loss_fn(), inputs, labels, weights)
  errors, effects = [], []
  for epsilon in (1e-2, 1e-3):
    methods = [EmbeddingFGM(epsilon=epsilon), EmbeddingGradientPenalty(epsilon=epsilon, variant="norm")]
    fgm, gp = [m.build(model) or m.compute_gradients(model, loss_fn(), inputs, labels, weights)
               for m in methods]
    flat = lambda out: np.concatenate([dense(g).ravel() for g in out.gradients])
    errors.append(np.linalg.norm(flat(fgm) - flat(gp)))
    effects.append(np.linalg.norm(flat(gp) - flat(plain)))
  # The methods differ from plain training by O(ε) and from each other by O(ε²).
  assert errors[0] < 0.05 * effects[0]
  assert errors[1] < 0.1 * errors[0] and effects[1] > 0.05 * effects[0]


def test_missing_embedding_lists_candidates():
  with pytest.raises(ValueError) as info:
    EmbeddingFGM(embedding_path="word_embeddings").build(tiny_bert())
  message = str(info.value)
  assert "token_embedding/embeddings (40, 16)" in message
  assert "position_embedding/embeddings" in message
