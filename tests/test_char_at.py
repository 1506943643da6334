"""Character-substitution adversarial training: the batch it trains on, its update, replicas, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import CHAR_VOCAB as VOCAB, additive_model, char_texts as texts, per_example_ce
from builders import random_pinyin
from tfadv.attacks.char_substitution import CharSubstitutionAttack
from tfadv.methods import CharSubstitutionTraining, EmbeddingFGM

N = 24


def _loss_fn(labels, logits, weights):
  return tf.reduce_sum(per_example_ce(labels, logits) * weights) / N


def _method(**kwargs):
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, top_k=4)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(2))
  return CharSubstitutionTraining(attack, **kwargs), attack


def _labels(model, inputs):
  return np.argmax(model(inputs).numpy(), -1).astype(np.int32)


def _attacked_by_hand(attack, model, inputs, labels, chosen):
  """The batch with the examples at `chosen` replaced by what the attack,
  run on the whole batch on its own, makes of them."""
  _, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None, per_example_ce)
  ids = inputs["token_ids"].copy()
  ids[chosen] = extra["token_ids"].numpy()[chosen]
  assert np.any(ids[chosen] != inputs["token_ids"][chosen])  # the attack changed some
  return ids


EVERY_OTHER = np.arange(N) % 2 == 0


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_trains_on_the_batch_with_every_other_example_attacked(weight):
  """Reference: the attack run on its own over the whole batch, its ids put
  into every other example (positions 0, 2, ...) by hand, the loss
  differentiated by hand (+ w × ... the clean batch's with w > 0)."""
  model = additive_model(2)
  inputs = texts(2)
  labels = _labels(model, inputs)
  method, attack = _method(attacked_share=0.5, adversarial_weight=weight)
  method.build(model)
  out = method.compute_gradients(model, _loss_fn, inputs, tf.constant(labels), tf.ones([N]))
  ids = _attacked_by_hand(attack, model, inputs, labels, EVERY_OTHER)
  with tf.GradientTape() as tape:
    attacked_loss = _loss_fn(labels, model({**inputs, "token_ids": ids}), tf.ones([N]))
    clean_loss = _loss_fn(labels, model(inputs), tf.ones([N]))
    total = clean_loss + weight * attacked_loss if weight else attacked_loss
  want = tape.gradient(total, model.trainable_variables)
  for got, expected in zip(out.gradients, want):
    np.testing.assert_allclose(builders.dense(got), builders.dense(expected), rtol=1e-5,
                               atol=1e-6)
  assert float(out.metrics["attacked"]) == N // 2
  broken = (np.argmax(model({**inputs, "token_ids": ids}).numpy(), -1)[EVERY_OTHER]
            != labels[EVERY_OTHER])
  assert float(out.metrics["broken"]) == broken.sum() > 0


@pytest.mark.parametrize("share,attacked", [(0.5, N // 2), (0.25, N // 4), (0.2, 5)])
def test_only_the_attacked_share_goes_through_the_attack(share, attacked, monkeypatch):
  """Where m of the share k/m divides the batch the attack sees only the
  attacked examples (its cost scales with the share); 1/5 of 24 does not
  divide, so the whole batch is attacked and positions 0, 5, 10, 15, 20 kept.
  Either way the result is the reference's: every p with p mod m < k."""
  model = additive_model(2)
  inputs = texts(2)
  labels = _labels(model, inputs)
  method, attack = _method(attacked_share=share)
  method.build(model)
  seen = []
  original = type(attack).adversarial_outputs

  def spy(self, model, inputs, *args, **kwargs):
    seen.append(int(inputs["token_ids"].shape[0]))
    return original(self, model, inputs, *args, **kwargs)
  monkeypatch.setattr(type(attack), "adversarial_outputs", spy)
  out = method.compute_gradients(model, _loss_fn, inputs, tf.constant(labels), tf.ones([N]))
  assert seen[0] == (attacked if share != 0.2 else N)
  m, k = {0.5: (2, 1), 0.25: (4, 1), 0.2: (5, 1)}[share]
  chosen = np.arange(N) % m < k
  ids = _attacked_by_hand(attack, model, inputs, labels, chosen)
  with tf.GradientTape() as tape:
    loss = _loss_fn(labels, model({**inputs, "token_ids": ids}), tf.ones([N]))
  for got, expected in zip(out.gradients, tape.gradient(loss, model.trainable_variables)):
    np.testing.assert_allclose(builders.dense(got), builders.dense(expected), rtol=1e-5,
                               atol=1e-6)
  assert float(out.metrics["attacked"]) == attacked


def test_a_share_that_is_not_a_small_fraction_is_refused():
  from tfadv.errors import SettingError  # pylint: disable=g-import-not-at-top
  with pytest.raises(SettingError, match=r"attacked_share = 0.123456: must be k/m with m <= 64"):
    CharSubstitutionTraining(attacked_share=0.123456)
  with pytest.raises(SettingError, match="must be k/m with m <= 64"):
    CharSubstitutionTraining(attacked_share=1 / 65)
  assert CharSubstitutionTraining(attacked_share=1 / 64).period == (64, 1)


def test_combines_with_fgm():
  """FGM + character AT: FGM's step on the batch with its share attacked."""
  model = additive_model(2)
  inputs = texts(2)
  labels = tf.constant(_labels(model, inputs))
  method, attack = _method(attacked_share=0.5, inner=EmbeddingFGM(epsilon=0.5))
  method.build(model)
  out = method.compute_gradients(model, _loss_fn, inputs, labels, tf.ones([N]))
  ids = _attacked_by_hand(attack, model, inputs, labels.numpy(), EVERY_OTHER)
  fgm = EmbeddingFGM(epsilon=0.5)
  fgm.build(model)
  want = fgm.compute_gradients(model, _loss_fn, {**inputs, "token_ids": ids}, labels,
                               tf.ones([N]))
  for got, expected in zip(out.gradients, want.gradients):
    np.testing.assert_allclose(builders.dense(got), builders.dense(expected), rtol=1e-5,
                               atol=1e-6)
  assert "delta_norm" in out.metrics and "broken" in out.metrics


def _train(strategy, jit=False, share=0.5):
  arrays = {**texts(2), "label": _labels(additive_model(2), texts(2))}
  method, _ = _method(attacked_share=share, adversarial_weight=1.0)
  trainer = builders.trainer(lambda: additive_model(2), method,
                             lambda b: ({k: b[k] for k in ("token_ids", "padding_mask")},
                                        b["label"]), N, strategy=strategy, jit=jit,
                             optimizer_fn=lambda: keras.optimizers.SGD(0.1))
  metrics = builders.train(trainer, arrays, 2, N)
  return builders.weights(trainer.model), metrics


@pytest.mark.parametrize("share,attacked", [(0.5, N // 2), (0.2, 5)])
def test_two_replicas_and_xla_equal_one_device(mirrored, share, attacked):
  """The attacked positions are the global batch's (p mod m < k), so two
  replicas attack and train on what one device does, gathering the share
  (0.5) or attacking the whole batch (1/5: 5 does not divide 12); XLA
  compiles it."""
  one, metrics = _train(tf.distribute.get_strategy(), share=share)
  two, _ = _train(mirrored, share=share)
  compiled, _ = _train(tf.distribute.get_strategy(), jit=True, share=share)
  for a, b, c in zip(one, two, compiled):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
  assert metrics["attacked"] == attacked


def test_an_inner_method_that_needs_replayed_batches_is_refused():
  from tfadv.errors import SettingError  # pylint: disable=g-import-not-at-top
  from tfadv.methods import EmbeddingOutputFree  # pylint: disable=g-import-not-at-top
  with pytest.raises(SettingError, match=r"inner = EmbeddingOutputFree: its batch_replays"):
    CharSubstitutionTraining(inner=EmbeddingOutputFree(replays=3))


@pytest.mark.slow
def test_a_text_run_trains_with_character_at_from_its_config(tmp_path):
  """tfadv.main builds the attack's tables from the task's vocabulary
  (`prepare`) and reports how many examples each step attacked and broke."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, "-m", "tfadv.main", "--gin_file=configs/demo.gin",
       "--gin_param=Experiment.method = @CharSubstitutionTraining()",
       "--gin_param=Experiment.train_steps = 4", "--gin_param=Experiment.steps_per_loop = 2",
       "--gin_param=Experiment.eval_attacks = {}", "--gin_param=ProductReviews.num_train = 200",
       "--gin_param=ProductReviews.num_eval = 40", "--gin_param=ProductReviews.num_validation = 0",
       "--gin_param=Experiment.eval_every = 0", f"--model_dir={tmp_path}/run"],
      cwd=builders.REPO, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "attacked" in proc.stdout and "broken" in proc.stdout
