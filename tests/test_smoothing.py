"""Randomized substitution smoothing: the confidence bound, the overlaps and the certificate, by hand."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from builders import CHAR_H as H, CHAR_L as L, CHAR_V as V, CHAR_VOCAB as VOCAB
from tfadv.attacks.char_substitution import CharSubstitutionAttack
from tfadv.experiment import build_trainer
from tfadv.data.pipeline import distributed_dataset
from tfadv.smoothing import SubstitutionSmoothing, clopper_pearson_lower

A, B, C, D = (VOCAB.index(ch) for ch in "中钟国果")


def _binomial_tail(k, n, p):
  return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k,n,alpha", [(8, 10, 0.05), (150, 200, 0.01), (37, 40, 0.05),
                                       (1, 5, 0.1)])
def test_clopper_pearson_lower_bound_is_where_the_binomial_tail_is_alpha(k, n, alpha):
  p = float(clopper_pearson_lower(tf.constant([k]), n, alpha)[0])
  assert _binomial_tail(k, n, p) == pytest.approx(alpha, rel=1e-4)
  assert _binomial_tail(k, n, p + 1e-3) > alpha  # the largest such p: the bound is tight


def test_clopper_pearson_closed_forms():
  bounds = clopper_pearson_lower(tf.constant([200, 0]), 200, 0.05).numpy()
  assert bounds[0] == pytest.approx(0.05 ** (1 / 200), rel=1e-6)  # k = n: α^(1/n)
  assert bounds[1] == 0.0


def _smoothing(pinyin_rows, probability, **kwargs):
  table = np.full((V, 2), -1, np.int32)
  for token, candidates in pinyin_rows.items():
    table[token, :len(candidates)] = candidates
  smoothing = SubstitutionSmoothing(
      CharSubstitutionAttack(budget=2, max_fraction=1.0, embedding_candidates=0,
                             pinyin_candidates=2), probability=probability, **kwargs)
  smoothing.set_vocabulary(VOCAB, pinyin=table)
  return smoothing


def test_position_overlaps_by_hand():
  """cand(中) = {钟, 国}, cand(钟) = {中}, cand(国) = {}; p = 0.3.
  At 中: μ = 中 .7, 钟 .15, 国 .15. An attacker's 钟 makes it 钟 .7, 中 .3:
  overlap .3 + .15 = .45; its 国 makes it 国 1: overlap .15. ω = .15.
  At 钟: μ = 钟 .7, 中 .3; 中 there makes it 中 .7, 钟 .15, 国 .15: overlap
  .15 + .3 = .45 = ω. At 国 (no candidates) and 果 (none): 1."""
  smoothing = _smoothing({A: [B, C], B: [A]}, 0.3)
  ids = tf.constant([[VOCAB.index("[CLS]"), A, B, C, D, VOCAB.index("[SEP]")] + [0] * (L - 6)])
  real = tf.constant([[True] * 6 + [False] * (L - 6)])
  table = tf.zeros((V, H))
  omega = smoothing.position_overlaps(table, ids, real).numpy()[0]
  np.testing.assert_allclose(omega[:6], [1.0, 0.15, 0.45, 1.0, 1.0, 1.0], rtol=1e-6)


def constant_model():
  """Predicts class 0 whatever the text (and has the embedding the threat reads)."""
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  mask = keras.Input((L,), dtype="bool", name="padding_mask")
  embedded = keras.layers.Embedding(V, H, name="token_embedding")(ids)
  pooled = keras.layers.Lambda(lambda t: tf.reduce_sum(t[0], 1) * 0.0)([embedded, mask])
  dense = keras.layers.Dense(2)
  model = keras.Model({"token_ids": ids, "padding_mask": mask}, dense(pooled))
  dense.bias.assign([1.0, 0.0])
  return model


def _sentences(*rows):
  ids = np.zeros((len(rows), L), np.int32)
  mask = np.zeros((len(rows), L), bool)
  for n, row in enumerate(rows):
    tokens = [VOCAB.index("[CLS]"), *row, VOCAB.index("[SEP]")]
    ids[n, :len(tokens)] = tokens
    mask[n, :len(tokens)] = True
  return {"token_ids": ids, "padding_mask": mask}


def test_the_certificate_by_hand_on_symmetric_and_one_sided_candidates():
  """p = .5. {中, 钟} are each other's only candidate: the noise at 中 and at
  钟 is the same (ω = 1, SAFER's symmetric case), so changing them costs the
  vote nothing. cand(国) = {果}, cand(果) = {}: ω(国) = .5. A constant model
  votes 100 of 100, p_A ≥ .05^(1/100) = .9705 (Clopper-Pearson):
  '中中' holds at radius 1 and 2 (Δ = 0); '中国' does not (Δ₁ = .5,
  .9705 − .5 < .5); a wrong label is never certified."""
  smoothing = _smoothing({A: [B], B: [A], C: [D]}, 0.5, num_samples=100, num_selection=10,
                         confidence=0.95)
  inputs = _sentences([A, A], [A, C], [C, C], [A, A])
  labels = tf.constant([0, 0, 0, 1])
  logits, extra = smoothing.adversarial_outputs(constant_model(), inputs, labels, None, None)
  assert np.argmax(logits.numpy(), -1).tolist() == [0, 0, 0, 0]
  np.testing.assert_allclose(extra["p_lower"].numpy(), 0.05 ** (1 / 100), rtol=1e-5)
  assert extra["certified1"].numpy().tolist() == [1.0, 0.0, 0.0, 0.0]
  assert extra["certified2"].numpy().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_copies_substitute_at_the_stated_rate_with_the_candidates_only():
  smoothing = _smoothing({A: [B, C]}, 0.3)
  ids = tf.constant(_sentences([A] * 8)["token_ids"])
  real = tf.constant(_sentences([A] * 8)["padding_mask"])
  sets = smoothing._candidate_sets(tf.zeros((V, H)), ids)  # pylint: disable=protected-access
  copies = smoothing._copies(sets, ids, real, 1, 2000).numpy()[0]  # pylint: disable=protected-access
  body = copies[:, 1:9]
  assert set(np.unique(body)) == {A, B, C}
  assert np.mean(body != A) == pytest.approx(0.3, abs=0.01)
  assert np.mean(body == B) == pytest.approx(0.15, abs=0.01)
  np.testing.assert_array_equal(copies[:, 0], VOCAB.index("[CLS]"))  # never a special token


def test_the_trainer_reports_smoothed_and_certified_accuracy_apart_from_the_attacks():
  smoothing = _smoothing({A: [B], B: [A], C: [D]}, 0.5, num_samples=50, num_selection=5)
  attack = CharSubstitutionAttack(budget=1, max_fraction=1.0, embedding_candidates=0,
                                  pinyin_candidates=2)
  attack.set_vocabulary(VOCAB, pinyin=smoothing.threat._pinyin.numpy())  # pylint: disable=protected-access
  arrays = {**_sentences([A, A], [A, C], [C, C], [A, A]), "label": np.array([0, 0, 1, 0])}
  trainer = build_trainer(constant_model, None, global_batch_size=4,
                          split_batch=lambda b: ({k: b[k] for k in ("token_ids", "padding_mask")},
                                                 b["label"]),
                          eval_attacks={"sub1": attack, "smooth": smoothing})
  metrics = trainer.evaluate(iter(distributed_dataset(trainer.strategy, arrays, 4, shuffle=False)), 1)
  assert metrics["accuracy_smooth"] == 0.75            # the smoothed vote: class 0
  assert metrics["smooth_certified1"] == 0.5           # 中中 twice
  assert "accuracy_worst_case" not in metrics          # one attack: no worst case
  assert "success_rate_smooth" not in metrics
