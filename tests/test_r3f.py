"""R3F: the loss and gradients against a hand-written reference, the draws, the branches, resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import B, C, L, V, batch_arrays, dense, loss_fn, split, tiny_bert
from builders import text_inputs, tiny_masked_batch, tiny_masked_model
from tfadv.methods.r3f import R3F

SIGMA, LAMBDA = 0.5, 2.0  # large enough that the KL term moves every gradient


def _hand_noise(noise_type, seed, step, mask):
  """The documented draw: stateless Philox from (seed, step) over the batch,
  U(−σ, σ) or N(0, σ²), zero at padding."""
  shape = (B, L, 3)
  if noise_type == "uniform":
    z = tf.random.stateless_uniform(shape, [seed, step], -1.0, 1.0, alg="philox")
  else:
    z = tf.random.stateless_normal(shape, [seed, step], alg="philox")
  return SIGMA * z.numpy() * mask[..., None]


def _hand_step(model, embedding, head, inputs, labels, noise, detach=True):
  """fairseq's criterion written out: mean CE on the clean pass plus λ times
  the batch mean of KL(p‖q) + KL(q‖p), keras's KL, the noisy branch's
  embeddings detached."""
  with tf.GradientTape() as tape:
    clean_embeddings = embedding(inputs["token_ids"])
    logits = head(clean_embeddings)
    noisy_in = tf.stop_gradient(clean_embeddings) if detach else clean_embeddings
    noisy = head(noisy_in + noise)
    ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
    p, q = tf.nn.softmax(logits), tf.nn.softmax(noisy)
    kl = tf.reduce_mean(keras.losses.kl_divergence(p, q) + keras.losses.kl_divergence(q, p))
    total = ce + LAMBDA * kl
  return ce.numpy(), kl.numpy(), [dense(g) for g in tape.gradient(total, model.trainable_variables)]


@pytest.mark.parametrize("noise_type", ["uniform", "normal"])
def test_r3f_equals_hand_computed_loss_and_gradients(noise_type):
  model, embedding, head, inputs, labels, mask = tiny_masked_batch()
  method = R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, noise_type=noise_type, seed=7)
  method.build(model)
  out = method.compute_gradients(model, loss_fn(), inputs, labels, tf.ones([B]))
  noise = _hand_noise(noise_type, 7, 0, mask)
  ce, kl, want = _hand_step(model, embedding, head, inputs, labels, noise)
  assert float(out.loss) == pytest.approx(ce, rel=1e-6)
  assert float(out.metrics["sym_kl"]) == pytest.approx(kl, rel=1e-4)
  assert kl > 1e-3  # the term is not negligible at this σ
  for got, expected in zip(out.gradients, want):
    np.testing.assert_allclose(dense(got), expected, rtol=1e-4, atol=1e-6)
  norms = np.sqrt((noise ** 2).sum(axis=(1, 2)))
  assert float(out.metrics["noise_norm"]) == pytest.approx(norms.mean(), rel=1e-5)


def test_r3f_embedding_table_learns_only_from_the_clean_branch():
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  method = R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, seed=7)
  method.build(model)
  out = method.compute_gradients(model, loss_fn(), inputs, labels, tf.ones([B]))
  noise = _hand_noise("uniform", 7, 0, mask)
  _, _, attached = _hand_step(model, embedding, head, inputs, labels, noise, detach=False)
  _, _, detached = _hand_step(model, embedding, head, inputs, labels, noise)
  table = [i for i, v in enumerate(model.trainable_variables) if v is embedding.embeddings][0]
  assert not np.allclose(attached[table], detached[table], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(dense(out.gradients[table]), detached[table], rtol=1e-4,
                             atol=1e-6)


def test_r3f_noise_is_zero_at_padding_fresh_each_step_and_sized_by_sigma():
  model, _, _ = tiny_masked_model()
  arrays = batch_arrays()
  mask = tf.constant(arrays["padding_mask"].astype(np.float32))[..., None]
  method = R3F(epsilon=0.25, seed=3)
  method.build(model)
  first, second = method.noise(mask).numpy(), method.noise(mask).numpy()
  assert int(method.variables[-1].numpy()) == 2  # the checkpointed step count
  assert np.all(first[~arrays["padding_mask"]] == 0)
  real = first[arrays["padding_mask"]]
  assert np.abs(real).max() <= 0.25 and np.abs(real).max() > 0.2
  assert not np.allclose(first, second)
  assert R3F().epsilon == 1e-5 and R3F().r3f_lambda == 1.0  # fairseq's defaults
  assert R3F().noise_type == "uniform"
  with pytest.raises(ValueError, match="noise_type"):
    R3F(noise_type="gaussian")


def test_r3f_passes_are_training_passes_and_a_zero_weight_example_adds_no_kl():
  # tiny_masked_model with dropout in its head: the clean pass, then the noisy
  # one, draw masks as two training passes from the same seed state do; the
  # last example has weight 0 (a padding row) and adds nothing.
  keras.utils.set_random_seed(0)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  mask_in = keras.Input((L,), dtype="bool", name="padding_mask")
  embedding = keras.layers.Embedding(V, 3, name="token_embedding")
  head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dropout(0.5),
                           keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(C)])
  model = keras.Model({"token_ids": ids, "padding_mask": mask_in}, head(embedding(ids)))
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  weights = np.ones(B, np.float32)
  weights[-1] = 0.0
  method = R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, seed=7)
  method.build(model)
  out, _ = builders.rewound(model, lambda: method.compute_gradients(
      model, loss_fn(), inputs, labels, tf.constant(weights)))
  clean_embeddings = embedding(inputs["token_ids"])
  logits = head(clean_embeddings, training=True)
  noisy = head(clean_embeddings + _hand_noise("uniform", 7, 0, mask), training=True)
  ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy()
  p, q = tf.nn.softmax(logits), tf.nn.softmax(noisy)
  kl = (keras.losses.kl_divergence(p, q) + keras.losses.kl_divergence(q, p)).numpy()
  assert float(out.loss) == pytest.approx(np.sum(ce * weights) / B, rel=1e-6)
  assert float(out.metrics["sym_kl"]) == pytest.approx(np.sum(kl * weights) / B, rel=1e-4)
  assert abs(np.sum(kl * weights) - np.sum(kl)) > 1e-4  # the zero weight matters here


def test_r3f_on_two_replicas_takes_the_one_device_step(mirrored):
  # The KL term is a mean over the global batch and each example's noise is
  # drawn over the global batch, so two replicas take one device's step.
  arrays = batch_arrays(n=8)
  two = builders.trainer(tiny_bert, R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, seed=4), split, 8,
                         strategy=mirrored, optimizer_fn=lambda: keras.optimizers.SGD(1.0))
  batch = next(iter(builders.distributed_dataset(mirrored, arrays, 8, shuffle=True, seed=3)))
  rows = [tf.nest.map_structure(lambda t: t.numpy(), local)
          for local in mirrored.experimental_local_results(batch)]
  whole = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  before = [v.numpy() for v in two.model.trainable_variables]
  metrics = builders.train(two, arrays, 1, 8)
  model = tiny_bert()
  method = R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, seed=4)
  method.build(model)
  inputs, labels = split(whole)
  out = method.compute_gradients(model, loss_fn(8), inputs, labels, tf.ones([8]))
  for b, v, g in zip(before, two.model.trainable_variables, out.gradients):
    np.testing.assert_allclose(b - v.numpy(), dense(g), rtol=2e-4, atol=2e-6)
  assert metrics["sym_kl"] == pytest.approx(float(out.metrics["sym_kl"]), rel=1e-4)


def test_r3f_resumes_exactly_from_a_checkpoint(tmp_path):
  arrays = batch_arrays(n=8)

  def fresh():
    return builders.trainer(tiny_bert, R3F(epsilon=0.3, seed=4), split, 4,
                            input_shape=(4, L))

  def checkpoint(trainer):
    return tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                               **{f"m{i}": v for i, v in enumerate(trainer.method.variables)})

  straight = fresh()
  builders.train(straight, arrays, 3, 4)
  first = fresh()
  builders.train(first, arrays, 1, 4)
  path = checkpoint(first).save(str(tmp_path / "ckpt"))
  resumed = fresh()
  checkpoint(resumed).restore(path)
  ds = builders.distributed_dataset(resumed.strategy, arrays, 4, shuffle=True, seed=3,
                                    start_step=1)
  resumed.train(iter(ds), 2)
  for a, b in zip(straight.model.trainable_variables, resumed.model.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("run_seed,own_seed,drawn_from", [(5, None, 5), (6, None, 6), (5, 7, 7)])
def test_r3f_noise_follows_the_runs_seed_unless_its_own_is_bound(run_seed, own_seed, drawn_from):
  """Three seeds of a table draw three noises, not one (the method's seed
  was 0 in every run before)."""
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  inputs, labels = text_inputs(arrays), arrays["label"]
  mask = arrays["padding_mask"].astype(np.float32)
  method = R3F(epsilon=SIGMA, r3f_lambda=LAMBDA, seed=own_seed)
  builders.build_trainer(lambda: model, method, global_batch_size=B, split_batch=split,
                         seed=run_seed)
  out = method.compute_gradients(model, loss_fn(), inputs, labels, tf.ones([B]))
  _, kl, _ = _hand_step(model, embedding, head, inputs, labels,
                        _hand_noise("uniform", drawn_from, 0, mask))
  assert float(out.metrics["sym_kl"]) == pytest.approx(kl, rel=1e-4)


def test_the_experiment_passes_its_seed_to_the_method(tmp_path, fewclue_dir):
  builders.configure(builders.tnews_bindings(fewclue_dir, seed=4) + ["Experiment.method = @R3F()"])
  experiment = builders.experiment_lib.Experiment()  # pylint: disable=no-value-for-parameter
  experiment.build(str(tmp_path), tf.distribute.get_strategy(), print_fn=lambda line: None)
  assert experiment.method.draw_seed == 4 and experiment.method.get_config()["seed"] == 4


def test_the_methods_draw_counters_are_state_the_optimizer_never_trains():
  """A method's variables (the random draws' step count, Free's memory) are
  checkpointed state, never trainable: nothing may hand them to an optimizer."""
  from tfadv.methods import EmbeddingFGM, EmbeddingOutputFGM  # pylint: disable=g-import-not-at-top
  model, _, _ = tiny_masked_model()
  from tfadv.methods import FreeLB  # pylint: disable=g-import-not-at-top
  for method in (R3F(), EmbeddingFGM(direction="random"), EmbeddingOutputFGM(direction="random"),
                 FreeLB(carry_over=True)):
    method.build(model, input_shape=(B, L))
    state = [v.state if isinstance(v, tf.random.Generator) else v for v in method.variables]
    assert state and not any(v.trainable for v in state), method
