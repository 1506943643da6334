"""Embedding-matrix FGM and gradient penalty: references, exactness, distribution, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import B, C, L, V, batch_arrays, dense, loss_fn, split, tiny_bert
from builders import dropout_model, rewound, text_inputs
from tfadv.data.pipeline import WEIGHTS, distributed_dataset
from tfadv.methods import EmbeddingFGM, EmbeddingGradientPenalty, Plain, random_direction
from tfadv.methods import embedding_matrix
from tfadv.methods.embedding_matrix import combine_rows



def tiny_mlp(dtype="float64", seed=0):
  """Embedding -> flatten -> tanh -> logits, small enough for finite differences."""
  keras.utils.set_random_seed(seed)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  x = keras.layers.Embedding(V, 4, name="token_embedding", dtype=dtype,
                             embeddings_initializer=keras.initializers.RandomNormal(stddev=0.5))(ids)
  x = keras.layers.Flatten(dtype=dtype)(x)
  x = keras.layers.Dense(6, activation="tanh", dtype=dtype)(x)
  return keras.Model({"token_ids": ids}, keras.layers.Dense(C, dtype=dtype)(x))


def eager_grads(model, inputs, labels, weights, fn):
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), weights)
  return loss, [dense(g) for g in tape.gradient(loss, model.trainable_variables)]


def _fgm_step(method):
  """One `compute_gradients` of `method` on tiny_bert, and the eager reference's
  pieces: (model, inputs, labels, weights, loss_fn, output, embedding table,
  clean gradients, ∂L/∂E)."""
  model = tiny_bert()
  inputs, labels = split(batch_arrays())
  weights = tf.ones([B])
  fn = loss_fn()
  method.build(model)
  out = method.compute_gradients(model, fn, inputs, labels, weights)
  # Reference: plain eager passes, perturbing the variable itself.
  table = model.backbone.token_embedding.embeddings
  position = [i for i, v in enumerate(model.trainable_variables) if v is table][0]
  _, clean = eager_grads(model, inputs, labels, weights, fn)
  return model, inputs, labels, weights, fn, out, table, clean, clean[position]


@pytest.mark.parametrize("form", ["adversarial", "clean_plus_adversarial"])
@pytest.mark.parametrize("norm", ["l2", "sign"])
def test_fgm_equals_hand_computed_two_pass_update(form, norm):
  method = EmbeddingFGM(epsilon=0.3, norm=norm, form=form, adversarial_weight=0.5)
  model, inputs, labels, weights, fn, out, table, clean, g = _fgm_step(method)
  arrays = batch_arrays()
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


@pytest.mark.parametrize("norm", ["l2", "sign"])
def test_fgm_random_control_has_the_adversarial_norm_in_a_random_direction(norm):
  method = EmbeddingFGM(epsilon=0.3, norm=norm, direction="random", seed=5)
  model, inputs, labels, weights, fn, out, table, _, g = _fgm_step(method)
  # Reference: the adversarial Δ by hand, then the documented draw
  # N(0, 1) from stateless seed (seed, step 0), row by row with Δ's row norm.
  noise = tf.random.stateless_normal(g.shape, seed=[5, 0], alg="philox").numpy()
  if norm == "sign":
    delta = 0.3 * np.sign(np.abs(g)) * np.sign(noise)  # ±ε wherever g ≠ 0
  else:
    adversarial = 0.3 * g / np.linalg.norm(g)
    delta = np.stack([np.linalg.norm(a) * n / np.linalg.norm(n)
                      for a, n in zip(adversarial, noise)])
    assert abs(np.sum(delta * adversarial)) / 0.09 < 0.5  # not the adversarial direction
    # Each row (each token's embedding) receives what the adversarial Δ gives it.
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1),
                               np.linalg.norm(adversarial, axis=1), rtol=1e-5, atol=1e-7)
  assert set(np.nonzero(np.abs(delta).sum(1))[0]) == set(np.nonzero(np.abs(g).sum(1))[0])
  original = table.numpy()
  table.assign(original + delta)
  _, adv = eager_grads(model, inputs, labels, weights, fn)
  table.assign(original)
  for got, want in zip(out.gradients, adv):
    np.testing.assert_allclose(dense(got), want, rtol=1e-4, atol=1e-6)
  # Exactly the adversarial Δ's norm (ε for l2; ε·√(entries) for sign).
  adversarial_norm = 0.3 * (np.sqrt(np.count_nonzero(g)) if norm == "sign" else 1.0)
  np.testing.assert_allclose(float(out.metrics["delta_norm"]), adversarial_norm, rtol=1e-5)
  assert int(method.variables[0].numpy()) == 1  # the next step draws anew


def test_fgm_passes_are_training_passes_that_draw_fresh_dropout_masks():
  # Reference: from the same dropout seed state, a clean training pass, then
  # a training pass with Δ = ε·g/‖g‖ added to the table. FGM's loss, its
  # adversarial loss and the seed state it leaves must be theirs: its
  # adversarial pass draws new masks and hands the seed on to the next step.
  model = dropout_model()
  arrays = batch_arrays()
  inputs, labels, weights, fn = text_inputs(arrays), arrays["label"], tf.ones([B]), loss_fn()
  method = EmbeddingFGM(epsilon=0.3)
  method.build(model)
  assert method.variables == []  # no random control: nothing of its own to checkpoint
  out, after_fgm = rewound(
      model, lambda: method.compute_gradients(model, fn, inputs, labels, weights))
  table = model.get_layer("token_embedding").embeddings
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), weights)
  g = dense(tape.gradient(loss, table))
  original = table.numpy()
  table.assign(original + 0.3 * g / np.linalg.norm(g))
  adv_loss = fn(labels, model(inputs, training=True), weights)
  table.assign(original)
  np.testing.assert_allclose(float(out.loss), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(out.metrics["adv_loss"]), float(adv_loss), rtol=1e-6)
  for got, want in zip(after_fgm, builders.dropout_state(model)):
    np.testing.assert_array_equal(got, want)
  # The masks matter here: inference gives another loss.
  assert abs(float(loss) - float(fn(labels, model(inputs, training=False), weights))) > 1e-3


def test_gradient_penalty_pass_is_a_training_pass():
  # Its one forward pass draws dropout masks as a plain training pass does
  # from the same seed state: the same loss (not inference's).
  model = dropout_model()
  arrays = batch_arrays()
  inputs, labels, weights, fn = text_inputs(arrays), arrays["label"], tf.ones([B]), loss_fn()
  method = EmbeddingGradientPenalty(epsilon=0.5, form="matrix")
  method.build(model)
  out, _ = rewound(model, lambda: method.compute_gradients(model, fn, inputs, labels, weights))
  loss = fn(labels, model(inputs, training=True), weights)
  np.testing.assert_allclose(float(out.loss), float(loss), rtol=1e-6)
  assert abs(float(loss) - float(fn(labels, model(inputs, training=False), weights))) > 1e-3


def test_a_vanishing_gradient_keeps_fgms_direction_and_a_finite_penalty():
  """A batch the model already fits well can give an embedding gradient far
  below 1e-12 in norm (or exactly zero, e.g. every weight 0): FGM's Δ still
  points along it (ascent, never descent), and the penalty ε‖g‖ stays finite,
  about 0."""
  gradient = np.zeros([V, 3], np.float32)
  gradient[2] = [3e-14, 0.0, -4e-14]  # norm 5e-14
  delta = EmbeddingFGM(epsilon=1.0).perturbation(tf.constant(gradient)).numpy()
  assert np.sum(delta * gradient) > 0 and np.linalg.norm(delta) <= 1.0
  np.testing.assert_allclose(delta[2] / np.linalg.norm(delta), gradient[2] / 5e-14, rtol=1e-5)
  assert not np.delete(delta, 2, axis=0).any()
  zero = EmbeddingFGM(epsilon=1.0).perturbation(tf.zeros([V, 3])).numpy()
  assert np.isfinite(zero).all() and not zero.any()
  penalty = EmbeddingGradientPenalty(epsilon=1.0, variant="norm").penalty
  for squared_norm in (0.0, 2.5e-27):
    s = tf.constant(squared_norm)
    with tf.GradientTape() as tape:
      tape.watch(s)
      value = penalty(s)
    assert np.isfinite(float(tape.gradient(value, s))), squared_norm  # no NaN in the update
    assert np.isfinite(float(value)) and 0 <= float(value) < 1e-11, squared_norm


def test_combine_rows_sums_duplicates_without_dense_table():
  g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                       tf.constant([7, 2, 7]), tf.constant([10, 2]))
  indices, rows = combine_rows(g)
  assert rows.shape == (3, 2)  # one slot per occurrence, never 10 x 2
  got = {int(i): r.tolist() for i, r in zip(indices.numpy(), rows.numpy()) if r.any()}
  assert got == {2: [3.0, 4.0], 7: [6.0, 8.0]}
  # Row 0 (BERT's [PAD]) is a row like any other; the padding slots' zero rows
  # point at row 0 too, so scattering the slots adds exactly the sums.
  g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                       tf.constant([0, 4, 0]), tf.constant([10, 2]))
  indices, rows = combine_rows(g)
  scattered = tf.tensor_scatter_nd_add(tf.zeros([10, 2]), indices[:, None], rows).numpy()
  want = np.zeros((10, 2), np.float32)
  want[0], want[4] = [6.0, 8.0], [3.0, 4.0]
  np.testing.assert_array_equal(scattered, want)


def test_a_dense_matrix_gradient_is_combined_as_it_is_either_way():
  # A dense gradient (the matrix also used outside the lookup, e.g. tied to
  # an output layer) has one row per vocabulary entry, each once.
  g = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))
  slices = embedding_matrix.as_indexed_slices(g)
  np.testing.assert_array_equal(slices.indices.numpy(), [0, 1, 2, 3])
  np.testing.assert_array_equal(embedding_matrix.dense_gradient(slices, 4).numpy(), g.numpy())
  for combine in ("dense", "sorted"):
    assert float(embedding_matrix.squared_norm(g, 4, combine)) == float(np.sum(g.numpy() ** 2))


def _trainer(strategy, model_fn, method, optimizer_fn, jit=False, global_batch=B):
  return builders.trainer(model_fn, method, split, global_batch, strategy=strategy,
                          optimizer_fn=optimizer_fn, jit=jit)


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


@pytest.mark.slow
@pytest.mark.parametrize("method_fn", [
    lambda: EmbeddingFGM(epsilon=0.5),
    lambda: EmbeddingFGM(epsilon=0.5, norm="sign", form="clean_plus_adversarial"),
    lambda: EmbeddingFGM(epsilon=0.5, combine="sorted"),
    lambda: EmbeddingFGM(epsilon=0.5, direction="random"),
    # Su's penalty is a sum over examples, so it splits over replicas exactly.
    lambda: EmbeddingGradientPenalty(epsilon=0.5, form="per_occurrence")])
def test_matrix_methods_two_replicas_equal_one_device(method_fn, mirrored):
  arrays = batch_arrays(n=16)
  make_opt = lambda: keras.optimizers.Adam(1e-2)
  one = _trainer(tf.distribute.get_strategy(), tiny_bert, method_fn(), make_opt, global_batch=8)
  two = _trainer(mirrored, tiny_bert, method_fn(), make_opt, global_batch=8)
  m1 = _train(one, arrays, 3, global_batch=8)
  m2 = _train(two, arrays, 3, global_batch=8)
  for a, b in zip(one.model.trainable_variables, two.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=2e-6)
  for key in m1:
    if key not in ("loss", "accuracy", "steps", "grad_norm"):
      np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("method_fn", [
    Plain, lambda: EmbeddingFGM(epsilon=0.5),
    lambda: EmbeddingFGM(epsilon=0.5, form="clean_plus_adversarial"),
    lambda: EmbeddingFGM(epsilon=0.5, combine="sorted"),
    lambda: EmbeddingFGM(epsilon=0.5, direction="random", norm="sign"),
    lambda: EmbeddingGradientPenalty(epsilon=0.5),
    lambda: EmbeddingGradientPenalty(epsilon=0.5, form="matrix"),
    lambda: EmbeddingGradientPenalty(epsilon=0.5, variant="norm")])
@pytest.mark.slow
def test_methods_compile_with_xla(method_fn, monkeypatch):
  # XLA's Philox kernel draws another stream than TensorFlow's: the random
  # control's draw is replaced by a fixed pattern, the rest compared exactly.
  monkeypatch.setattr(random_direction, "normal", lambda shape, seed: tf.reshape(
      tf.sin(tf.cast(tf.range(tf.reduce_prod(shape)), tf.float32) * 12.9898), shape))
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


@pytest.mark.parametrize("form", ["matrix", "per_occurrence"])
def test_gradient_penalty_on_two_replicas_penalises_what_its_form_says(form, mirrored):
  # per_occurrence: a sum over examples, so two replicas take the one-device
  # step on the whole batch. matrix: each replica penalises its own mean
  # gradient (Su's per-batch penalty, per replica), so the step is the mean
  # of one-device steps on each replica's rows. SGD(1): the step is -g.
  arrays = batch_arrays(n=8)
  two = _trainer(mirrored, tiny_bert, EmbeddingGradientPenalty(epsilon=0.5, form=form),
                 lambda: keras.optimizers.SGD(1.0), global_batch=8)
  ds = distributed_dataset(mirrored, arrays, 8, shuffle=True, seed=3)
  batch = next(iter(ds))
  rows = [tf.nest.map_structure(lambda t: t.numpy(), local)
          for local in mirrored.experimental_local_results(batch)]
  before = [v.numpy() for v in two.model.trainable_variables]
  metrics = two.train(iter(distributed_dataset(mirrored, arrays, 8, shuffle=True, seed=3)), 1)
  step = [b - v.numpy() for b, v in zip(before, two.model.trainable_variables)]
  parts = ([{k: np.concatenate([r[k] for r in rows]) for k in rows[0]}] if form == "per_occurrence"
           else rows)
  want, penalty = None, 0.0
  for part in parts:
    model = tiny_bert()
    method = EmbeddingGradientPenalty(epsilon=0.5, form=form)
    method.build(model)
    inputs, labels = split(part)
    n = len(labels)
    out = method.compute_gradients(model, loss_fn(n), inputs, labels, tf.constant(part[WEIGHTS]))
    grads = [dense(g) / len(parts) for g in out.gradients]
    penalty += float(out.metrics["grad_penalty"]) / len(parts)
    want = grads if want is None else [w + g for w, g in zip(want, grads)]
  for got, expected in zip(step, want):
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-6)
  assert metrics["grad_penalty"] == pytest.approx(penalty, rel=1e-4)  # the penalty added


def _occurrence_gradients(model, ids, labels):
  """∂L/∂e for every token occurrence: the lookup done by hand (numpy
  indexing), the rest of tiny_mlp applied layer by layer."""
  table = model.get_layer("token_embedding").embeddings.numpy()
  occurrences = tf.constant(table[np.asarray(ids)])  # B x L x d, one row per occurrence
  with tf.GradientTape() as tape:
    tape.watch(occurrences)
    x = occurrences
    for layer in model.layers[2:]:  # Flatten, Dense(tanh), Dense
      x = layer(x)
    loss = loss_fn()(labels, x, tf.ones([B], tf.float64))
  return loss, tape.gradient(loss, occurrences).numpy()


def _penalised_objective(model, inputs, labels, epsilon, variant, form):
  loss, rows = _occurrence_gradients(model, inputs["token_ids"], labels)
  if form == "matrix":  # the matrix gradient: occurrence rows summed per token
    g = np.zeros(model.get_layer("token_embedding").embeddings.shape)
    np.add.at(g, np.asarray(inputs["token_ids"]).ravel(), rows.reshape(-1, rows.shape[-1]))
    sq = float(np.sum(g * g))
  else:
    sq = float(np.sum(rows * rows))
  return float(loss) + (0.5 * epsilon * sq if variant == "squared" else epsilon * np.sqrt(sq))


@pytest.mark.parametrize("form", ["per_occurrence", "matrix"])
@pytest.mark.parametrize("variant", ["squared", "norm"])
def test_gradient_penalty_matches_central_differences(variant, form):
  model = tiny_mlp()
  arrays = batch_arrays()
  inputs, labels = {"token_ids": arrays["token_ids"]}, arrays["label"]
  method = EmbeddingGradientPenalty(epsilon=0.8, variant=variant, form=form)
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
        values.append(_penalised_objective(model, inputs, labels, 0.8, variant, form))
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
    methods = [EmbeddingFGM(epsilon=epsilon),
               EmbeddingGradientPenalty(epsilon=epsilon, variant="norm", form="matrix")]
    fgm, gp = [m.build(model) or m.compute_gradients(model, loss_fn(), inputs, labels, weights)
               for m in methods]
    flat = lambda out: np.concatenate([dense(g).ravel() for g in out.gradients])
    errors.append(np.linalg.norm(flat(fgm) - flat(gp)))
    effects.append(np.linalg.norm(flat(gp) - flat(plain)))
  # The methods differ from plain training by O(ε) and from each other by O(ε²).
  assert errors[0] < 0.05 * effects[0]
  assert errors[1] < 0.1 * errors[0] and effects[1] > 0.05 * effects[0]


def test_gradient_penalty_forms_on_repeated_tokens():
  # Su's penalty squares each occurrence's row; the matrix form squares the
  # per-token sums. Token ids[0, 1] occurs three times in example 0 and
  # [CLS]-like id 2 once in every example, so the two must differ; with no
  # repeats at all they coincide.
  model = tiny_mlp()
  arrays = batch_arrays()
  inputs, labels = {"token_ids": arrays["token_ids"]}, arrays["label"]
  weights = tf.ones([B], tf.float64)
  penalties = {}
  for form in ("per_occurrence", "matrix"):
    method = EmbeddingGradientPenalty(epsilon=0.8, form=form)
    method.build(model)
    out = method.compute_gradients(model, loss_fn(), inputs, labels, weights)
    penalties[form] = float(out.metrics["grad_penalty"])
    want = _penalised_objective(model, inputs, labels, 0.8, "squared", form)
    np.testing.assert_allclose(float(out.metrics["total_loss"]), want, rtol=1e-10)
  # Summed rows can cancel or add: the forms differ, in either direction.
  assert abs(penalties["matrix"] - penalties["per_occurrence"]) > 0.02 * penalties["per_occurrence"]

  unique = np.arange(B * L).reshape(B, L) % V  # B*L = 32 < V = 40: no repeats
  inputs = {"token_ids": unique}
  for form in ("per_occurrence", "matrix"):
    method = EmbeddingGradientPenalty(epsilon=0.8, form=form)
    method.build(model)
    penalties[form] = float(method.compute_gradients(
        model, loss_fn(), inputs, labels, weights).metrics["grad_penalty"])
  np.testing.assert_allclose(penalties["matrix"], penalties["per_occurrence"], rtol=1e-10)


def test_per_occurrence_penalty_needs_the_lookup_gradient():
  keras.utils.set_random_seed(0)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  layer = keras.layers.Embedding(V, 4, name="token_embedding")
  x = keras.layers.Flatten()(layer(ids))
  # The matrix is used again outside the lookup: its gradient is dense.
  x = keras.layers.Concatenate()([x, keras.layers.Lambda(
      lambda t: keras.ops.broadcast_to(keras.ops.sum(layer.embeddings)[None, None], (keras.ops.shape(t)[0], 1)))(x)])
  model = keras.Model({"token_ids": ids}, keras.layers.Dense(C)(x))
  arrays = batch_arrays()
  method = EmbeddingGradientPenalty(epsilon=0.8)
  method.build(model)
  with pytest.raises(ValueError, match="form='matrix'"):
    method.compute_gradients(model, loss_fn(), {"token_ids": arrays["token_ids"]},
                             arrays["label"], tf.ones([B]))


@pytest.mark.parametrize("make", [
    lambda combine: EmbeddingFGM(epsilon=0.4, combine=combine),
    lambda combine: EmbeddingFGM(epsilon=0.4, norm="sign", combine=combine,
                                 form="clean_plus_adversarial"),
    lambda combine: EmbeddingGradientPenalty(epsilon=0.8, form="matrix", combine=combine)])
def test_dense_and_sorted_combination_agree(make):
  # The batch repeats tokens (duplicate gradient rows) in and across examples.
  model = tiny_bert()
  arrays = batch_arrays()
  inputs, labels = split(arrays)
  outputs = []
  for combine in ("dense", "sorted"):
    method = make(combine)
    method.build(model)
    outputs.append(method.compute_gradients(model, loss_fn(), inputs, labels, tf.ones([B])))
  for a, b in zip(*[out.gradients for out in outputs]):
    np.testing.assert_allclose(dense(a), dense(b), rtol=1e-5, atol=1e-7)
  for key in outputs[0].metrics:
    np.testing.assert_allclose(float(outputs[0].metrics[key]),
                               float(outputs[1].metrics[key]), rtol=1e-5)


def test_bad_combine_lists_the_choices():
  with pytest.raises(ValueError, match=r"\('dense', 'sorted'\)"):
    EmbeddingFGM(combine="sparse")
  with pytest.raises(ValueError, match=r"\('per_occurrence', 'matrix'\)"):
    EmbeddingGradientPenalty(form="su")


def test_missing_embedding_lists_candidates():
  with pytest.raises(ValueError) as info:
    EmbeddingFGM(embedding_path="word_embeddings").build(tiny_bert())
  message = str(info.value)
  assert "matches no variable" in message
  assert "token_embedding/embeddings (40, 16)" in message
  assert "position_embedding/embeddings" in message
  assert "kernel" not in message  # 2-D, but not an embedding
  with pytest.raises(ValueError, match="'embeddings' matches several variables"):
    EmbeddingFGM(embedding_path="embeddings").build(tiny_bert())
