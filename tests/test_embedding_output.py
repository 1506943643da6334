"""Embedding-output perturbations: hook, references, projection, masking, replicas, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import B, L, V, batch_arrays, dense, loss_fn, split, tiny_bert
from builders import dropout_model, text_inputs, tiny_masked_batch, tiny_masked_model
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods import random_direction
from tfadv.methods import (EmbeddingOutputFGM, EmbeddingOutputFree, EmbeddingOutputPGD, FreeLB, Plain,
                           R3F)
from tfadv.perturbation import per_example_norm
from tfadv.models.hooks import EmbeddingOutputHook

H = 16  # tiny_bert's hidden size


def _hand_pass(model, embedding, head, inputs, labels, delta, fn):
  """Loss, weight gradients and ∂L/∂δ with δ added by hand (no hook)."""
  delta = tf.convert_to_tensor(delta, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(delta)
    logits = head(embedding(inputs["token_ids"]) + delta)
    loss = fn(labels, logits, tf.ones([B]))
  *grads, g = tape.gradient(loss, model.trainable_variables + [delta])
  return loss, [dense(x) for x in grads], g.numpy()


def _unit(g, mask):
  g = g * mask[..., None]
  return g / (np.sqrt((g ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-12)


@pytest.mark.parametrize("form", ["adversarial", "clean_plus_adversarial"])
def test_output_fgm_equals_hand_computed_two_pass_update(form):
  model, embedding, head, inputs, labels, mask = tiny_masked_batch()
  fn = loss_fn()
  method = EmbeddingOutputFGM(epsilon=0.4, form=form, adversarial_weight=0.5)
  method.build(model)
  out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]))

  _, clean, g = _hand_pass(model, embedding, head, inputs, labels, np.zeros((B, L, 3)), fn)
  delta = 0.4 * _unit(g, mask)
  assert np.all(delta[mask == 0] == 0)
  _, adv, _ = _hand_pass(model, embedding, head, inputs, labels, delta, fn)
  expected = adv if form == "adversarial" else [c + 0.5 * a for c, a in zip(clean, adv)]
  assert len(out.gradients) == len(expected) == len(model.trainable_variables)
  for got, want in zip(out.gradients, expected):
    np.testing.assert_allclose(dense(got), want, rtol=1e-5, atol=1e-7)
  assert float(out.metrics["delta_norm"]) == pytest.approx(0.4, rel=1e-5)


@pytest.mark.parametrize("form", ["adversarial", "clean_plus_adversarial"])
def test_output_pgd_equals_hand_computed_ascent_then_update(form):
  # Madry et al.'s PGD on each example's embedding output: K = 3 ascent
  # steps δ ← Π(δ + α·g/‖g‖) from 0, then the update from the pass on δᴷ
  # (plus, with "clean_plus_adversarial", half a clean pass's gradients).
  model, embedding, head, inputs, labels, mask = tiny_masked_batch()
  fn = loss_fn()
  method = EmbeddingOutputPGD(epsilon=0.3, step_size=0.2, num_steps=3, random_start=False,
                              form=form, adversarial_weight=0.5)
  method.build(model)
  out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]))
  zero = np.zeros((B, L, 3), np.float32)
  delta = zero
  for _ in range(3):
    _, _, g = _hand_pass(model, embedding, head, inputs, labels, delta, fn)
    delta = _project(delta + 0.2 * _unit(g, mask), 0.3) * mask[..., None]
  adv_loss, adv, _ = _hand_pass(model, embedding, head, inputs, labels, delta, fn)
  clean_loss, clean, _ = _hand_pass(model, embedding, head, inputs, labels, zero, fn)
  expected = adv if form == "adversarial" else [c + 0.5 * a for c, a in zip(clean, adv)]
  assert len(out.gradients) == len(expected) == len(model.trainable_variables)
  for got, want in zip(out.gradients, expected):
    np.testing.assert_allclose(dense(got), want, rtol=1e-5, atol=1e-7)
  reported = adv_loss if form == "adversarial" else clean_loss
  assert float(out.loss) == pytest.approx(float(reported), rel=1e-5)
  assert float(out.metrics["adv_loss"]) == pytest.approx(float(adv_loss), rel=1e-5)
  norms = np.sqrt((delta ** 2).sum(axis=(1, 2)))
  assert float(out.metrics["delta_norm"]) == pytest.approx(norms.mean(), rel=1e-5)
  assert np.all(norms > 0.29)  # the ascent reached the sphere: the projection mattered
  # Without a step size, α = 2.5ε/K (Madry et al.).
  assert EmbeddingOutputPGD(epsilon=0.6, num_steps=3).step_size == pytest.approx(0.5)


def test_output_fgm_random_control_has_each_examples_adversarial_norm():
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  fn = loss_fn()
  method = EmbeddingOutputFGM(epsilon=0.4, direction="random", seed=7)
  method.build(model)
  out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]))
  # Reference: the adversarial δ by hand; the control is the documented draw,
  # N(0, 1) from stateless seed (seed, step 0) over the batch, masked,
  # scaled per example to the adversarial δ_i's norm.
  _, clean, g = _hand_pass(model, embedding, head, inputs, labels, np.zeros((B, L, 3)), fn)
  adversarial = 0.4 * _unit(g, mask)
  noise = tf.random.stateless_normal((B, L, 3), seed=[7, 0], alg="philox").numpy()
  norms = np.sqrt((adversarial ** 2).sum(axis=(1, 2), keepdims=True))
  delta = norms * _unit(noise, mask)
  assert np.all(delta[~arrays["padding_mask"]] == 0)
  np.testing.assert_allclose(np.sqrt((delta ** 2).sum(axis=(1, 2))), norms.ravel(), rtol=1e-6)
  cosines = (delta * adversarial).sum(axis=(1, 2)) / (norms.ravel() ** 2)
  assert np.all(np.abs(cosines) < 0.9)  # another direction
  _, adv, _ = _hand_pass(model, embedding, head, inputs, labels, delta, fn)
  for got, want in zip(out.gradients, [c + a for c, a in zip(clean, adv)]):
    np.testing.assert_allclose(dense(got), want, rtol=1e-5, atol=1e-7)
  assert float(out.metrics["delta_norm"]) == pytest.approx(0.4, rel=1e-5)


def _hand_uniform_start(seed, shape, mask, epsilon):
  """Algorithm 1's δ₀ = U(−ε, ε)/√N_δ, N_δ = real tokens × hidden, by hand."""
  u = tf.random.Generator.from_seed(seed).uniform(shape, -1.0, 1.0).numpy()
  n = mask.sum(axis=1)[:, None, None] * shape[-1]
  return epsilon * u * mask[..., None] / np.sqrt(n)


@pytest.mark.parametrize("start", ["zero", "algorithm_1"])
def test_freelb_equals_hand_computed_averaged_ascent(start):
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  fn = loss_fn()
  if start == "zero":
    method = FreeLB(epsilon=0.3, step_size=0.2, ascent_steps=3, init_magnitude=0.0)
    delta = np.zeros((B, L, 3), np.float32)
  else:  # the default: δ₀ drawn as Algorithm 1 says, from the method's generator
    method = FreeLB(epsilon=0.3, step_size=0.2, ascent_steps=3, seed=5)
    delta = _hand_uniform_start(5, (B, L, 3), mask, 0.3).astype(np.float32)
  method.build(model, input_shape=(B, L))
  out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]))

  total, first_loss = None, None
  for _ in range(3):
    loss, grads, g = _hand_pass(model, embedding, head, inputs, labels, delta, fn)
    last_loss = float(loss)
    first_loss = float(loss) if first_loss is None else first_loss
    total = grads if total is None else [t + x for t, x in zip(total, grads)]
    delta = delta + 0.2 * _unit(g, mask)
    norms = np.sqrt((delta ** 2).sum(axis=(1, 2), keepdims=True))
    delta = delta * np.minimum(1.0, 0.3 / (norms + 1e-12))
  for got, want in zip(out.gradients, total):
    np.testing.assert_allclose(dense(got), np.asarray(want) / 3, rtol=1e-5, atol=1e-7)
  # The reported loss is the first pass's (on e + δ₀); the buffer holds the
  # last ascent: masked, inside the ball (on its sphere after two steps of 0.2 > 0.3).
  assert float(out.loss) == pytest.approx(first_loss, rel=1e-5)
  assert float(out.metrics["adv_loss"]) == pytest.approx(last_loss, rel=1e-5)  # the last pass's
  np.testing.assert_allclose(method.perturbation.numpy(), delta, rtol=1e-5, atol=1e-7)


def _project(delta, epsilon):
  norms = np.sqrt((delta ** 2).sum(axis=(1, 2), keepdims=True))
  return delta * np.minimum(1.0, epsilon / (norms + 1e-12))


@pytest.mark.parametrize("carry", ["reset", "token", "slot"])
def test_free_on_text_equals_hand_computed_replays_with_each_carry(carry):
  """Free-2 over two batches: each pass gives the update and δ's ascent; a new
  batch starts from zero ('reset', a = 0 here), the token memory ('token'),
  or the previous batch's δ by position ('slot')."""
  model, embedding, head = tiny_masked_model()
  first, second = batch_arrays(), batch_arrays(seed=7)
  second["token_ids"][:, 1:3] = first["token_ids"][:, 1:3]  # tokens both batches have
  second["padding_mask"][:, -2:] = False  # other padding: the carried δ is re-masked
  fn = loss_fn()
  method = EmbeddingOutputFree(epsilon=0.3, step_size=0.2, replays=2, carry=carry,
                               init_magnitude=0.0 if carry == "reset" else 0.5, seed=5)
  assert method.batch_replays == 2
  method.build(model, input_shape=(B, L))
  # The documented initial memory: U(−a, a)/√hidden from stateless seed (seed, 1).
  memory = 0.5 / np.sqrt(3) * tf.random.stateless_uniform(
      (V, 3), [5, 1], -1.0, 1.0, alg="philox").numpy()
  delta = np.zeros((B, L, 3), np.float32)
  for arrays, replay in ((first, 0), (first, 1), (second, 0)):
    inputs, labels = text_inputs(arrays), arrays["label"]
    ids, real = arrays["token_ids"], arrays["padding_mask"]
    mask = real.astype(np.float32)
    out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]),
                                   replay_index=tf.constant(replay))
    if replay == 0 and carry == "reset":
      carried = np.zeros_like(delta)
    elif replay == 0 and carry == "token":
      carried = memory[ids]
    else:
      carried = delta
    # By hand: the carried δ on this batch's real tokens, inside the ball.
    start = _project(carried * mask[..., None], 0.3)
    loss, grads, g = _hand_pass(model, embedding, head, inputs, labels, start, fn)
    for got, want in zip(out.gradients, grads):
      np.testing.assert_allclose(dense(got), want, rtol=1e-5, atol=1e-7)
    assert float(out.loss) == pytest.approx(float(loss), rel=1e-6)
    delta = _project(start + 0.2 * _unit(g, mask), 0.3) * mask[..., None]
    np.testing.assert_allclose(method.perturbation.numpy(), delta, rtol=1e-5, atol=1e-7)
    if carry == "token":  # each token's row: the mean δ of its real occurrences
      for token in np.unique(ids[real]):
        memory[token] = delta[(ids == token) & real].mean(axis=0)
      np.testing.assert_allclose(method.memory.numpy(), memory, rtol=1e-5, atol=1e-7)
  # The third pass (a new batch) started from zero only with 'reset'.
  start_norms = np.sqrt((start ** 2).sum(axis=(1, 2)))
  assert np.all(start_norms == 0) if carry == "reset" else np.all(start_norms > 0.1)


@pytest.mark.slow
def test_free_on_text_token_memory_resumes_between_replays(tmp_path):
  """Kill after step 1 (batch 0's first replay), resume: the second replay
  continues batch 0's δ (the pipeline's replay index), batch 1 starts from
  the checkpointed memory; the same as an uninterrupted run, bit for bit."""
  arrays = batch_arrays(n=8)

  def fresh():
    return _trainer(tf.distribute.get_strategy(),
                    EmbeddingOutputFree(epsilon=0.5, replays=2, carry="token"))

  def checkpoint(trainer):
    return tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                               **{f"m{i}": v for i, v in enumerate(trainer.method.variables)})

  def data(trainer, start_step):
    return iter(distributed_dataset(trainer.strategy, arrays, B, shuffle=True, seed=3,
                                    start_step=start_step, repeats_per_batch=2))

  straight = fresh()
  straight.train(data(straight, 0), 3)
  assert [v.name.split(":")[0] for v in straight.method.variables[1:]] == [  # after the generator
      "free_output_perturbation", "free_output_token_memory"]
  first = fresh()
  first.train(data(first, 0), 1)
  path = checkpoint(first).save(str(tmp_path / "ckpt"))
  resumed = fresh()
  checkpoint(resumed).restore(path)
  resumed.train(data(resumed, 1), 2)
  for a, b in zip(straight.model.trainable_variables + straight.method.variables[1:],
                  resumed.model.trainable_variables + resumed.method.variables[1:]):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_freelb_random_start_is_uniform_scaled_per_example_and_masked():
  model = tiny_bert()
  method = FreeLB(epsilon=0.7, seed=3)
  method.build(model, input_shape=(64, L))
  real = np.ones((64, L), np.float32)
  real[::2, 5:] = 0  # half the examples have 3 padding positions
  delta = method.initial_delta(tf.constant(real)[..., None]).numpy()
  assert np.all(delta[real == 0] == 0)
  n = real.sum(axis=1) * H
  scaled = delta * np.sqrt(n)[:, None, None] / 0.7  # U(−1, 1) on real tokens
  values = scaled[real == 1].ravel()
  assert values.min() >= -1 and values.max() <= 1
  assert values.min() < -0.99 and values.max() > 0.99
  assert abs(values.mean()) < 0.02 and abs(values.var() - 1 / 3) < 0.01
  # Each example's δ₀ lies in its ε-ball, its norm near ε/√3.
  norms = np.sqrt((delta ** 2).sum(axis=(1, 2)))
  assert np.all(norms <= 0.7) and abs(norms.mean() - 0.7 / np.sqrt(3)) < 0.02
  # a = ε = 1 by default starts at random too; only a = 0 starts at zero.
  for init, moved in ((None, True), (0.0, False)):
    method = FreeLB(epsilon=1.0, init_magnitude=init)
    method.build(model, input_shape=(64, L))
    assert bool(np.any(method.initial_delta(tf.constant(real)[..., None]).numpy())) == moved
  with pytest.raises(ValueError, match="needs the per-replica input shape"):
    FreeLB().build(model, input_shape=(64,))


def test_freelb_projection_puts_large_steps_on_the_sphere():
  model, _, _ = tiny_masked_model()
  arrays = batch_arrays()
  method = FreeLB(epsilon=0.25, step_size=5.0, ascent_steps=2)
  method.build(model, input_shape=(B, L))
  method.compute_gradients(model, loss_fn(), text_inputs(arrays), arrays["label"], tf.ones([B]))
  norms = per_example_norm(method.perturbation).numpy().ravel()
  np.testing.assert_allclose(norms, 0.25, rtol=1e-5)  # ε binds
  assert np.all(method.perturbation.numpy()[~arrays["padding_mask"]] == 0)


def test_freelb_carry_over_starts_from_the_previous_batchs_delta():
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  fn = loss_fn()
  carried = FreeLB(epsilon=0.3, step_size=0.2, ascent_steps=2, carry_over=True)
  carried.build(model, input_shape=(B, L))
  first = carried.compute_gradients(model, fn, inputs, labels, tf.ones([B]))
  # The buffer started at zero: the first pass was clean.
  clean, _, _ = _hand_pass(model, embedding, head, inputs, labels, np.zeros((B, L, 3)), fn)
  assert float(first.loss) == pytest.approx(float(clean), rel=1e-6)
  previous = carried.perturbation.numpy()
  assert np.all(per_example_norm(previous).numpy() > 0.1)
  second = carried.compute_gradients(model, fn, inputs, labels, tf.ones([B]))
  start_loss, _, g = _hand_pass(model, embedding, head, inputs, labels, previous, fn)
  assert float(second.loss) == pytest.approx(float(start_loss), rel=1e-6)
  assert abs(float(second.loss) - float(clean)) > 1e-4
  # A carried buffer reports how much of it cannot move: the share of real
  # tokens' entries whose gradient is zero at the last pass.
  mask = arrays["padding_mask"].astype(np.float32)
  moved = _project(previous + 0.2 * _unit(g, mask), 0.3) * mask[..., None]
  _, _, g = _hand_pass(model, embedding, head, inputs, labels, moved, fn)
  from tfadv.perturbation import stuck_share  # pylint: disable=g-import-not-at-top
  want = stuck_share(tf.constant(g), tf.constant(mask[..., None])).numpy()
  assert float(second.metrics["stuck"]) == pytest.approx(float(want), abs=1e-7)


def test_freelb_with_one_replay_and_zero_start_is_plain_training():
  model, _, _ = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  fn = loss_fn()
  method = FreeLB(epsilon=0.3, ascent_steps=1, init_magnitude=0.0)
  method.build(model, input_shape=(B, L))
  out = method.compute_gradients(model, fn, inputs, labels, tf.ones([B]))
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), tf.ones([B]))
  for got, want in zip(out.gradients, tape.gradient(loss, model.trainable_variables)):
    np.testing.assert_allclose(dense(got), dense(want), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sync", [True, False])
def test_freelb_sync_dropout_gives_every_pass_the_first_pass_masks(sync):
  # δ never moves (δ₀ = 0, α = 0), so with the first pass's masks on all K
  # passes the K averaged gradients are one pass's: a plain pass drawn from
  # the same dropout seed state is the reference. Fresh masks per pass
  # (sync_dropout=False) average three different passes.
  model = dropout_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  fn = loss_fn()
  method = FreeLB(epsilon=0.3, step_size=0.0, ascent_steps=3, init_magnitude=0.0,
                  sync_dropout=sync)
  method.build(model, input_shape=(B, L))
  start = builders.dropout_state(model)
  assert start  # the dropout layers' seed states
  out, after_freelb = builders.rewound(
      model, lambda: method.compute_gradients(model, fn, inputs, labels, tf.ones([B])))
  with tf.GradientTape() as tape:
    loss = fn(labels, model(inputs, training=True), tf.ones([B]))
  want = tape.gradient(loss, model.trainable_variables)
  after_one_pass = builders.dropout_state(model)
  same = all(np.allclose(dense(g), dense(w), rtol=1e-5, atol=1e-7)
             for g, w in zip(out.gradients, want))
  assert same == sync
  if sync:  # the next step draws fresh masks: the state moved on by one pass
    for got, expected in zip(after_freelb, after_one_pass):
      np.testing.assert_array_equal(got, expected)
    assert any(not np.array_equal(a, b) for a, b in zip(after_freelb, start))


def test_hook_perturbs_keras_hub_token_embedding_output():
  model = tiny_bert()
  arrays = batch_arrays()
  ids = np.arange(5, 5 + B * L, dtype=np.int32).reshape(B, L) % V
  ids[:, 0] = 2
  arrays["token_ids"] = ids
  inputs, _ = split(arrays)
  table = model.backbone.token_embedding.embeddings
  hook = EmbeddingOutputHook(model, "token_embedding")
  run = lambda: model.backbone(inputs)["sequence_output"].numpy()
  clean = run()
  with hook.adding(tf.zeros([B, L, H])):
    np.testing.assert_array_equal(run(), clean)
  # With no token repeated in the batch (but [CLS]), adding δ to the output
  # at a position equals moving that token's row of the embedding matrix.
  rows = np.random.RandomState(1).randn(V, H).astype(np.float32) * 0.1
  rows[2] = 0.0
  delta = rows[ids]
  with hook.adding(tf.constant(delta)):
    hooked = run()
  with keras.StatelessScope(state_mapping=[(table, table + rows)]):
    moved = run()
  np.testing.assert_allclose(hooked, moved, rtol=1e-5, atol=1e-5)
  assert np.abs(hooked - clean).max() > 0.05
  np.testing.assert_array_equal(run(), clean)  # unhooked again


def test_missing_layer_lists_candidates():
  with pytest.raises(ValueError) as info:
    EmbeddingOutputFGM(layer_name="word_embeddings").build(tiny_bert())
  message = str(info.value)
  assert "token_embedding (ReversibleEmbedding)" in message
  assert "segment_embedding (Embedding)" in message


def test_method_and_attack_read_the_padding_mask_alike():
  """One helper: the mask, all ones without a key, one error naming the fix."""
  from tfadv.attacks import EmbeddingOutputAttack  # pylint: disable=g-import-not-at-top
  model = tiny_bert()
  arrays = batch_arrays()
  inputs, labels = split(arrays)
  method = EmbeddingOutputFGM(epsilon=0.5)
  method.build(model)
  mask = method._mask(inputs).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(mask[..., 0], arrays["padding_mask"].astype(np.float32))
  unmasked = EmbeddingOutputFGM(epsilon=0.5, padding_mask_key=None)
  unmasked.build(model)
  np.testing.assert_array_equal(unmasked._mask(inputs).numpy(), np.ones((B, L, 1)))  # pylint: disable=protected-access
  renamed = {k if k != "padding_mask" else "mask": v for k, v in inputs.items()}
  with pytest.raises(ValueError, match="EmbeddingOutputFGM: no input 'padding_mask'.*"
                     "set `padding_mask_key`"):
    method._mask(renamed)  # pylint: disable=protected-access
  attack = EmbeddingOutputAttack(epsilon=0.5, num_steps=1)
  with pytest.raises(ValueError, match="EmbeddingOutputAttack: no input 'padding_mask'"):
    attack.adversarial_logits(model, renamed, labels, tf.random.Generator.from_seed(0),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def test_pgd_iterates_stay_in_each_ball_and_off_padding():
  model = tiny_bert()
  arrays = batch_arrays()
  inputs, labels = split(arrays)
  method = EmbeddingOutputPGD(epsilon=0.5, step_size=0.4, num_steps=4)
  method.build(model)
  mask = method._mask(inputs)  # pylint: disable=protected-access
  start = method._random_start(mask).numpy()  # pylint: disable=protected-access
  delta = method.attack(model, loss_fn(), inputs, labels, tf.ones([B]), mask).numpy()
  for d in (start, delta):
    norms = np.sqrt((d ** 2).sum(axis=(1, 2)))
    assert np.all(norms <= 0.5 * (1 + 1e-5)), norms
    assert np.all(d[~arrays["padding_mask"]] == 0)
  # 4 steps of 0.4 reach the sphere: the projection was active.
  np.testing.assert_allclose(np.sqrt((delta ** 2).sum(axis=(1, 2))), 0.5, rtol=1e-5)


@pytest.mark.parametrize("random_start", [False, True])
def test_embedding_attack_equals_hand_computed_pgd_in_inference_mode(random_start):
  from tfadv.attacks import EmbeddingOutputAttack  # pylint: disable=g-import-not-at-top
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  eps, alpha, steps = 0.3, 0.2, 3
  attack = EmbeddingOutputAttack(epsilon=eps, step_size=alpha, num_steps=steps,
                                 random_start=random_start)
  per_example = lambda y, z: keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)
  got = attack.adversarial_logits(model, inputs, labels, tf.random.Generator.from_seed(4),
                                  per_example).numpy()
  # By hand: δ ← Π_ε(δ + α·g_i/‖g_i‖₂) on real tokens, g of the summed loss.
  if random_start:  # uniform in each example's ball over its real tokens, drawn
    # as documented (`perturbation.random_start`): a masked Gaussian direction,
    # radius ε·u^(1/d), from a generator of the attack's seed.
    draw = tf.random.Generator.from_seed(4)
    direction = draw.normal([B, L, 3]).numpy() * mask[..., None]
    direction /= np.sqrt((direction ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-12
    u = draw.uniform([B, 1, 1]).numpy()
    dims = mask.sum(1)[:, None, None] * 3
    delta = eps * direction * u ** (1.0 / dims)
  else:
    delta = np.zeros([B, L, 3], np.float32)
  sum_loss = lambda y, z, w: tf.reduce_sum(per_example(y, z))
  for _ in range(steps):
    _, _, g = _hand_pass(model, embedding, head, inputs, labels, delta, sum_loss)
    delta = delta + alpha * _unit(g, mask)
    norms = np.sqrt((delta ** 2).sum(axis=(1, 2), keepdims=True))
    delta = delta * np.minimum(1.0, eps / (norms + 1e-12)) * mask[..., None]
  want = head(embedding(inputs["token_ids"]) + delta).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(want, model(inputs).numpy(), atol=1e-3)  # it moved the logits


def _trainer(strategy, method, jit=False, global_batch=B, learning_rate=1e-2):
  return builders.trainer(tiny_bert, method, split, global_batch, strategy=strategy,
                          optimizer_fn=lambda: keras.optimizers.Adam(learning_rate),
                          input_shape=(global_batch // strategy.num_replicas_in_sync, L),
                          jit=jit)


def _train(trainer, arrays, steps, global_batch=B):
  ds = distributed_dataset(trainer.strategy, arrays, global_batch, shuffle=True, seed=3,
                           repeats_per_batch=trainer.method.batch_replays)
  return trainer.train(iter(ds), steps)


METHODS = [
    lambda: EmbeddingOutputFGM(epsilon=0.5),
    lambda: EmbeddingOutputFGM(epsilon=0.5, form="adversarial"),
    lambda: EmbeddingOutputPGD(epsilon=0.5, num_steps=2, random_start=False),
    lambda: FreeLB(epsilon=0.5, step_size=0.3, ascent_steps=2, init_magnitude=0.0),
    lambda: EmbeddingOutputFree(epsilon=0.5, replays=2, carry="slot"),
    lambda: EmbeddingOutputFree(epsilon=0.5, replays=2, carry="reset", init_magnitude=0.0),
    # Every replica's memory copy gets the whole global batch's rows.
    lambda: EmbeddingOutputFree(epsilon=0.5, replays=2, carry="token"),
    # Zero start: Algorithm 1's random δ₀ is drawn per replica (and by XLA's
    # own generator kernel), so equality across devices needs δ₀ = 0.
    # The random control draws statelessly over the global batch: equal too.
    lambda: EmbeddingOutputFGM(epsilon=0.5, direction="random"),
    lambda: R3F(epsilon=0.5, r3f_lambda=2.0),  # its noise is drawn the same way
]


@pytest.mark.slow
@pytest.mark.parametrize("method_fn", METHODS)
def test_two_replicas_equal_one_device(method_fn, mirrored):
  arrays = batch_arrays(n=16)
  one = _trainer(tf.distribute.get_strategy(), method_fn(), global_batch=8)
  two = _trainer(mirrored, method_fn(), global_batch=8)
  m1 = _train(one, arrays, 3, global_batch=8)
  m2 = _train(two, arrays, 3, global_batch=8)
  for a, b in zip(one.model.trainable_variables, two.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=2e-6)
  for key in ("loss", "adv_loss", "delta_norm"):
    if key in m1 or key in m2:
      np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5)


def test_free_token_memory_on_two_replicas_is_the_one_device_memory(mirrored):
  """After a trained replay on two replicas, each replica's copy of the token
  memory holds the rows of the whole global batch (all-gathered), equal to a
  one-device run's; the trainer hands the method the pipeline's replay index."""
  arrays = batch_arrays(n=8)

  def trained(strategy):
    trainer = builders.trainer(
        lambda: tiny_masked_model()[0], EmbeddingOutputFree(epsilon=0.5, replays=2, carry="token"),
        split, 8, strategy=strategy, input_shape=(8 // strategy.num_replicas_in_sync, L))
    start = trainer.method.memory.numpy()
    builders.train(trainer, arrays, 1, 8, replays=2)
    return trainer, start

  one, start = trained(tf.distribute.get_strategy())
  two, _ = trained(mirrored)
  want = one.method.memory.numpy()
  assert (np.abs(want - start).max(axis=1) > 0).sum() > 4  # the batch's tokens were written
  copies = [v.numpy() for v in mirrored.experimental_local_results(two.method.memory)]
  assert len(copies) == 2
  for copy in copies:
    np.testing.assert_allclose(copy, want, rtol=1e-5, atol=1e-7)


def test_freelb_buffer_is_per_replica_and_masked(mirrored):
  arrays = batch_arrays(n=8)
  trainer = _trainer(mirrored, FreeLB(epsilon=0.5, step_size=0.3, ascent_steps=2),
                     global_batch=8)
  _train(trainer, arrays, 1, global_batch=8)
  buffers = [v.numpy() for v in trainer.method.perturbation.values]
  assert len(buffers) == 2 and buffers[0].shape == (4, L, H)
  assert not np.allclose(buffers[0], buffers[1])  # each replica's own examples
  ds = distributed_dataset(mirrored, arrays, 8, shuffle=True, seed=3)
  batch = next(iter(ds))
  for buffer, mask in zip(buffers, mirrored.experimental_local_results(
      batch["padding_mask"])):
    assert np.all(buffer[~mask.numpy()] == 0)
    assert np.all(per_example_norm(buffer).numpy() <= 0.5 * (1 + 1e-5))


def _fixed_normal(self, shape, mean=0.0, stddev=1.0, dtype=tf.float32):
  del self
  pattern = tf.sin(tf.cast(tf.range(tf.reduce_prod(shape)), dtype) * 12.9898)
  return tf.reshape(mean + stddev * pattern, shape)


def _fixed_uniform(self, shape, minval=0.0, maxval=1.0, dtype=tf.float32):
  del self
  pattern = 0.5 + 0.5 * tf.cos(tf.cast(tf.range(tf.reduce_prod(shape)), dtype) * 78.233)
  return tf.reshape(minval + (maxval - minval) * pattern, shape)


@pytest.mark.slow
@pytest.mark.parametrize("method_fn", METHODS[:1] + METHODS[2:] + [
    lambda: EmbeddingOutputPGD(epsilon=0.5, num_steps=2),  # random start
    lambda: FreeLB(epsilon=0.5, step_size=0.3, ascent_steps=2),  # Algorithm 1's start
    lambda: EmbeddingOutputFree(epsilon=0.5, replays=2)])  # 'reset', its random start
def test_output_methods_compile_with_xla(method_fn, monkeypatch):
  # XLA's random-number kernel draws another stream than TensorFlow's: the
  # draws are replaced by fixed patterns, and the rest is compared exactly.
  monkeypatch.setattr(tf.random.Generator, "normal", _fixed_normal)
  monkeypatch.setattr(tf.random.Generator, "uniform", _fixed_uniform)
  monkeypatch.setattr(random_direction, "per_example_normal",
                      lambda shape, seed: _fixed_normal(None, shape))
  monkeypatch.setattr(random_direction, "per_example_uniform",
                      lambda shape, seed: _fixed_uniform(None, shape, -1.0, 1.0))
  arrays = batch_arrays()
  plain = _trainer(tf.distribute.get_strategy(), method_fn())
  jitted = _trainer(tf.distribute.get_strategy(), method_fn(), jit=True)
  batch = next(iter(distributed_dataset(jitted.strategy, arrays, B, shuffle=True, seed=3)))
  assert "HloModule" in jitted._replica_train.experimental_get_compiler_ir(batch)(stage="hlo")
  m1, m2 = _train(plain, arrays, 2), _train(jitted, arrays, 2)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-4)
  for a, b in zip(plain.model.trainable_variables, jitted.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)


def test_perturbation_random_starts_and_stuck_share_by_hand():
  from tfadv import perturbation  # pylint: disable=g-import-not-at-top
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)[..., None]  # 2 examples × 3 tokens
  shape = [2, 3, 4]
  # ℓ∞ with a mask: U(−ε, ε) on real tokens, exactly 0 at padding.
  got = perturbation.random_start(shape, 0.5, "linf", tf.random.Generator.from_seed(1),
                                  mask=mask).numpy()
  want = tf.random.Generator.from_seed(1).uniform(shape, -0.5, 0.5).numpy() * mask
  np.testing.assert_array_equal(got, want)
  # ℓ2, uniform in the ball's volume without a mask: radius ε·u^(1/d), d = 12.
  got = perturbation.random_start(shape, 0.5, "l2", tf.random.Generator.from_seed(2)).numpy()
  draw = tf.random.Generator.from_seed(2)
  z = draw.normal(shape).numpy()
  u = draw.uniform([2, 1, 1]).numpy()
  want = 0.5 * z / np.sqrt((z ** 2).sum(axis=(1, 2), keepdims=True)) * u ** (1 / 12)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The stuck share: zero-gradient entries among the real tokens' entries.
  gradient = np.ones(shape, np.float32)
  gradient[0, 0, :3] = 0.0  # 3 stuck entries on a real token
  gradient[1, 2, :] = 0.0   # padding: never counted
  share = perturbation.stuck_share(tf.constant(gradient), tf.constant(mask)).numpy()
  assert share == pytest.approx(3 / 12)  # 12 real entries: 3 tokens × 4
  assert perturbation.stuck_share(tf.constant(gradient)).numpy() == pytest.approx(7 / 24)


def test_tiny_gradients_and_deltas_keep_their_direction():
  """A confident example's gradient can be far below 1e-12 in norm: its unit
  step still points along it (ascent, never descent), and a δ that small is
  inside the ball, so projecting leaves it as it is; zero stays zero."""
  from tfadv import perturbation  # pylint: disable=g-import-not-at-top
  x = np.zeros([3, 2, 2], np.float32)
  x[0] = [[3e-14, 0.0], [0.0, -4e-14]]  # norm 5e-14
  x[1] = [[3.0, 0.0], [0.0, -4.0]]  # norm 5
  unit = perturbation.normalize(tf.constant(x)).numpy()
  assert np.sum(unit[0] * x[0]) > 0 and np.linalg.norm(unit[0]) <= 1.0
  np.testing.assert_allclose(unit[0] / np.linalg.norm(unit[0]), x[0] / 5e-14, rtol=1e-5)
  np.testing.assert_allclose(unit[1], x[1] / 5.0, rtol=1e-6)
  assert not unit[2].any()
  projected = perturbation.project(tf.constant(x), 0.5).numpy()
  np.testing.assert_allclose(projected[0], x[0], rtol=1e-6)
  np.testing.assert_allclose(projected[1], x[1] * 0.1, rtol=1e-6)
  assert not projected[2].any()


def test_embedding_attack_runs_in_inference_mode_and_follows_the_model_it_is_given():
  from tfadv.attacks import EmbeddingOutputAttack  # pylint: disable=g-import-not-at-top
  model, embedding, head = tiny_masked_model()
  ids = next(t for t in model.inputs if t.name.startswith("token_ids"))
  # The same layers with a heavy dropout between them: in inference mode, the
  # same function.
  with_dropout = keras.Model(model.input, head(keras.layers.Dropout(0.9, seed=3)(embedding(ids))))
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  per_example = lambda y, z: keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)
  attack = EmbeddingOutputAttack(epsilon=0.3, num_steps=2, random_start=False)
  plain_logits = attack.adversarial_logits(model, inputs, labels, None, per_example).numpy()
  # One attack object, a second model: its own hook, not the first model's.
  dropout_logits = attack.adversarial_logits(with_dropout, inputs, labels, None,
                                             per_example).numpy()
  np.testing.assert_allclose(dropout_logits, plain_logits, rtol=1e-5, atol=1e-6)
  assert attack._hook.model is with_dropout  # pylint: disable=protected-access
  assert not np.allclose(plain_logits, model(inputs).numpy(), atol=1e-3)
  assert EmbeddingOutputAttack(epsilon=2.0, num_steps=4).step_size == 1.25  # 2.5·ε/K


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_epsilon_ramp_trains_each_step_at_its_share_of_epsilon(jit):
  """adversarial_start_step = 1, epsilon_ramp_steps = 2: step 0 plain, step 1
  at ε/2, step 2 at ε. References: separate trainers (plain, FGM at ε/2, FGM
  at ε), each taking one step from the weights the previous one left (SGD:
  no optimizer state to carry)."""
  arrays = batch_arrays(n=12)
  default = tf.distribute.get_strategy()

  def make(method, **kwargs):
    return builders.trainer(tiny_bert, method, split, B, jit=jit, input_shape=(B, L),
                            optimizer_fn=lambda: keras.optimizers.SGD(0.5), **kwargs)

  def data(start):
    return iter(distributed_dataset(default, arrays, B, shuffle=True, seed=3,
                                    start_step=start))

  ramp = make(EmbeddingOutputFGM(epsilon=0.8), adversarial_start_step=1,
              epsilon_ramp_steps=2)
  iterator = data(0)
  shown = [ramp.train(iterator, 1) for _ in range(3)]
  assert "epsilon" not in shown[0]  # the warm-up's plain step
  assert [m["epsilon_scale"] for m in shown[1:]] == [0.5, 1.0]
  assert shown[1]["epsilon"] == pytest.approx(0.4) and shown[2]["epsilon"] == pytest.approx(0.8)
  assert shown[1]["delta_norm"] == pytest.approx(0.4, rel=1e-5)
  previous = None
  for step, method in enumerate([Plain(), EmbeddingOutputFGM(epsilon=0.4),
                                 EmbeddingOutputFGM(epsilon=0.8)]):
    reference = make(method)
    if previous is not None:
      for target, source in zip(reference.model.trainable_variables, previous):
        target.assign(source)
    reference.train(data(step), 1)
    previous = [v.numpy() for v in reference.model.trainable_variables]
  for a, b in zip(ramp.model.trainable_variables, previous):
    np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)


def test_the_ramp_scales_perturbations_only_inside_a_training_step():
  from tfadv import attacks, perturbation  # pylint: disable=g-import-not-at-top
  assert perturbation.ramped(0.3) == 0.3  # no ramp in force
  with perturbation.epsilon_scaling(tf.constant(0.5)):
    assert float(perturbation.ramped(0.3)) == pytest.approx(0.15)
  with perturbation.epsilon_scaling(None):
    assert perturbation.ramped(0.3) == 0.3
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
  x = tf.fill([4, 6], 0.5)
  labels = tf.constant([0, 1, 2, 0])
  attack = attacks.InputAttack(epsilon=0.2, step_size=0.2, num_steps=1, random_start=False)
  loss = lambda y, logits: keras.losses.sparse_categorical_crossentropy(y, logits,
                                                                      from_logits=True)
  full = attack(model, x, labels, tf.random.Generator.from_seed(0), loss)
  with perturbation.epsilon_scaling(tf.constant(0.25)):
    ramped = attack(model, x, labels, tf.random.Generator.from_seed(0), loss)
  assert np.abs(full - x).max() == pytest.approx(0.2, rel=1e-5)
  assert np.abs(ramped - x).max() == pytest.approx(0.05, rel=1e-5)
