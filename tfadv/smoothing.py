"""Randomized substitution smoothing: a certified defence against the character attack (SAFER's idea).

The smoothed classifier g (Ye et al., "SAFER: A Structure-free Approach for
Certified Robustness to Adversarial Word Substitutions", ACL 2020) predicts
the class the base model f gives most often over random copies of the text:
each attackable character x_j is replaced, with probability `probability`,
by one of its candidates drawn uniformly, the candidates being exactly the
character attack's (`CharSubstitutionAttack`: same-pinyin characters and
the model's nearest characters), so the defence and the threat model share
their sets. Nothing is learned: smoothing sits on top of any trained model.

Certification (SAFER's Theorem 1, with the total-variation bound written for
our sets, which unlike SAFER's are not symmetric): if the attacker changes
position j to a candidate c, the noise distribution there moves from μ_j
(x_j kept with 1 − p, each candidate with p/k) to ν_c (c kept, c's own
candidates), which overlap by ω_j(c) = Σ_v min(μ_j(v), ν_c(v)); ω_j is the
least of them over c. Coupling the positions independently, the copies of
x and of any x' that changes a set S of positions coincide with probability
at least Π_{j∈S} ω_j, so P_{x'}(f = A) ≥ p_A − Δ with Δ = 1 − Π_{j∈S} ω_j.
With p_A's lower confidence bound (Clopper–Pearson at `confidence`, from
`num_samples` copies drawn apart from the `num_selection` that chose A, as
Cohen et al. 2019 do), the prediction provably holds for every attack of d
characters when p_A − Δ_d > 1/2, Δ_d taken over the d positions of smallest
ω (and never more than the attack's per-sentence budget). Certified accuracy
at radius d counts the examples predicted right and so certified.

Everything is in-graph and batched (`num_samples` copies per example in one
forward pass); the draws are stateless, from `seed`, so an evaluation
repeats exactly. In a config:

    Experiment.eval_attacks = {'smooth': @SubstitutionSmoothing()}

reports `accuracy_smooth` (the smoothed prediction's accuracy) and
`smooth_certified1`, `smooth_certified2` (certified accuracy at radius 1, 2)
beside the attacks' numbers; it is not an attack, so it does not enter
`accuracy_worst_case`.
"""

from typing import Optional, Sequence

import gin
import numpy as np
import tensorflow as tf

from tfadv import checks
from tfadv.attacks.char_substitution import CharSubstitutionAttack


def clopper_pearson_lower(successes, trials, alpha: float, iterations: int = 60):
  """One-sided lower confidence bound (level 1 − α) on a binomial p: the p
  with P(Bin(n, p) ≥ k) = α, i.e. the α quantile of Beta(k, n − k + 1)
  (0 when k = 0), by bisection on `tf.math.betainc` (in-graph, batched)."""
  k = tf.cast(successes, tf.float64)
  n = tf.cast(trials, tf.float64)
  low, high = tf.zeros_like(k), tf.ones_like(k)
  safe_k = tf.maximum(k, 1.0)
  for _ in range(iterations):
    mid = (low + high) / 2
    # P(Bin(n, mid) ≥ k) = I_mid(k, n − k + 1), increasing in mid.
    tail = tf.math.betainc(safe_k, n - safe_k + 1.0, mid)
    below = tail < alpha
    low = tf.where(below, mid, low)
    high = tf.where(below, high, mid)
  return tf.cast(tf.where(k > 0, low, 0.0), tf.float32)


RADII = checks.Rule("integers >= 1", lambda v: all(
    isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in v))


@gin.configurable
class SubstitutionSmoothing:
  """Majority vote over randomly substituted copies, with certified radii (module docstring).

  Args:
    threat: the character attack whose candidates, constraints and budget
      define the substitutions (default: `CharSubstitutionAttack()`).
    probability: p, the chance each attackable character is replaced in a copy.
    num_samples: copies that estimate the top class's probability.
    num_selection: copies (drawn apart) that choose the top class.
    confidence: 1 − α of the lower bound.
    radii: the radii d certified (`smooth_certified<d>`).
    seed: the draws' seed.

  Example:
  >>> smoothing = SubstitutionSmoothing(probability=0.3, num_samples=200)
  >>> # Experiment.eval_attacks = {"smooth": @SubstitutionSmoothing()} in a text config
  """

  predicts_alone = True  # its logits are the smoothed classifier's, not an attack's

  def __init__(self, threat: Optional[CharSubstitutionAttack] = None,
               probability: float = 0.3, num_samples: int = 200, num_selection: int = 20,
               confidence: float = 0.95, radii: Sequence[int] = (1, 2), seed: int = 0):
    checks.check("SubstitutionSmoothing", probability=(probability, checks.PROPER_FRACTION),
                 num_samples=(num_samples, checks.AT_LEAST_ONE),
                 num_selection=(num_selection, checks.AT_LEAST_ONE),
                 confidence=(confidence, checks.PROPER_FRACTION))
    checks.check("SubstitutionSmoothing", radii=(tuple(radii), RADII))
    self.threat = threat if threat is not None else CharSubstitutionAttack()
    self.probability = float(probability)
    self.num_samples = int(num_samples)
    self.num_selection = int(num_selection)
    self.confidence = float(confidence)
    self.radii = tuple(int(r) for r in radii)
    self.seed = int(seed)
    self.per_example_metrics = {f"certified{r}": "all" for r in self.radii}

  def prepare(self, task, model_dir: Optional[str] = None) -> None:
    self.threat.prepare(task, model_dir)

  def set_vocabulary(self, vocabulary, model_dir=None, pinyin=None) -> None:
    self.threat.set_vocabulary(vocabulary, model_dir, pinyin=pinyin)

  def _candidate_sets(self, table, ids):
    """([..., S] candidates, valid ones first, −1 after; [...] their count)
    of each id in `ids` ([B, L] or deeper) under the threat model."""
    shape = tf.shape(ids)
    flat = tf.reshape(ids, [1, -1])
    candidates = self.threat.candidates(table, flat)[0]
    valid = tf.logical_and(candidates >= 0, candidates != flat[0][:, None])
    valid = tf.logical_and(valid, self.threat.substitutable(tf.maximum(flat[0], 0))[:, None])
    order = tf.argsort(tf.cast(~valid, tf.int32), axis=-1, stable=True)
    compact = tf.where(tf.gather(valid, order, batch_dims=1),
                       tf.gather(candidates, order, batch_dims=1), -1)
    slots = candidates.shape[-1]
    return (tf.reshape(compact, tf.concat([shape, [slots]], 0)),
            tf.reshape(tf.reduce_sum(tf.cast(valid, tf.int32), -1), shape))

  def position_overlaps(self, table, ids, real, candidate_sets=None):
    """ω [B, L]: the least overlap, over the candidates c an attacker may put
    at each position, of the position's noise at x_j and at c (1 where the
    position cannot be changed). `candidate_sets`: `_candidate_sets(table,
    ids)`, when the caller has them."""
    p = self.probability
    mine, count = candidate_sets or self._candidate_sets(table, ids)     # [B, L, S], [B, L]
    attackable = real & (count > 0)
    theirs, their_count = self._candidate_sets(table, tf.maximum(mine, 0))  # [B, L, S, S], [B, L, S]
    # μ_j on its support: x_j with 1 − p, each candidate with p / k.
    support = tf.concat([ids[..., None], mine], -1)                       # [B, L, 1 + S]
    in_support = tf.concat([tf.ones_like(ids[..., None], tf.bool), mine >= 0], -1)
    k = tf.cast(tf.maximum(count, 1), tf.float32)[..., None]
    mu = tf.where(in_support, tf.concat(
        [tf.fill(tf.shape(ids[..., None]), 1.0 - p), tf.broadcast_to(p / k, tf.shape(mine))], -1),
                  0.0)
    # ν_c on the same support: c with 1 − p (1 when c has no candidates), each of c's own candidates p / k_c.
    kc = tf.cast(their_count, tf.float32)
    stay = tf.where(their_count > 0, 1.0 - p, 1.0)[..., None]            # [B, L, S, 1]
    each = tf.where(their_count > 0, p / tf.maximum(kc, 1.0), 0.0)[..., None]
    v = support[..., None, :]                                            # [B, L, 1, 1 + S]
    is_c = tf.cast(tf.equal(v, mine[..., None]), tf.float32)
    in_theirs = tf.cast(tf.reduce_any(tf.equal(v[..., None], theirs[..., None, :])
                                      & (theirs[..., None, :] >= 0), -1), tf.float32)
    nu = stay * is_c + each * in_theirs                                  # [B, L, S, 1 + S]
    overlap = tf.reduce_sum(tf.minimum(mu[..., None, :], nu), -1)        # [B, L, S]
    overlap = tf.where(mine >= 0, overlap, np.inf)
    omega = tf.minimum(tf.reduce_min(overlap, -1), 1.0)
    return tf.where(attackable & self.threat.substitutable(ids), omega, 1.0)

  def _copies(self, candidate_sets, ids, real, count_seed, copies):
    """[B, copies, L] randomly substituted copies of `ids`, whose candidate
    sets (`_candidate_sets`) are given."""
    mine, count = candidate_sets
    shape = tf.concat([tf.shape(ids)[:1], [copies], tf.shape(ids)[1:]], 0)
    replace = tf.random.stateless_uniform(shape, [self.seed, count_seed], alg="philox")
    pick = tf.random.stateless_uniform(shape, [self.seed, count_seed + 1], alg="philox")
    changeable = (real & (count > 0))[:, None, :]
    index = tf.minimum(tf.cast(pick * tf.cast(count, tf.float32)[:, None, :], tf.int32),
                       tf.maximum(count - 1, 0)[:, None, :])
    chosen = tf.gather(tf.broadcast_to(mine[:, None], tf.concat([shape, [mine.shape[-1]]], 0)),
                       index, batch_dims=3)
    return tf.where(changeable & (replace < self.probability), chosen, ids[:, None, :])

  def _votes(self, model, inputs, copies):
    """Class counts [B, C] of the model's predictions on `copies` [B, N, L]."""
    batch, n, length = tf.shape(copies)[0], copies.shape[1], tf.shape(copies)[2]
    tiled = {key: tf.repeat(value, n, axis=0) for key, value in inputs.items()}
    tiled[self.threat.token_ids_key] = tf.reshape(copies, [batch * n, length])
    logits = tf.cast(model(tiled, training=False), tf.float32)
    classes = tf.shape(logits)[-1]
    votes = tf.one_hot(tf.argmax(logits, -1), classes)
    return tf.reduce_sum(tf.reshape(votes, [batch, n, classes]), 1)

  def adversarial_outputs(self, model, inputs, labels, rng, loss_fn):
    """(log vote shares of the smoothed classifier, {"certified<d>": 0/1 per
    example: predicted right and certified at radius d})."""
    del rng, loss_fn  # stateless draws from `seed`; votes, not losses
    from tfadv.models.hooks import EmbeddingOutputHook  # pylint: disable=g-import-not-at-top
    hook = EmbeddingOutputHook(model, self.threat.layer_name)
    table = tf.cast(tf.convert_to_tensor(hook.layer.embeddings), tf.float32)
    inputs = {key: tf.convert_to_tensor(value) for key, value in inputs.items()}
    ids = tf.cast(inputs[self.threat.token_ids_key], tf.int32)
    real = tf.cast(inputs[self.threat.padding_mask_key], tf.bool)
    candidate_sets = self._candidate_sets(table, ids)  # once: copies and overlaps share them
    selection = self._votes(model, inputs,
                            self._copies(candidate_sets, ids, real, 1, self.num_selection))
    top = tf.argmax(selection, -1, output_type=tf.int32)
    votes = self._votes(model, inputs,
                        self._copies(candidate_sets, ids, real, 3, self.num_samples))
    p_lower = clopper_pearson_lower(tf.gather(votes, top, batch_dims=1), self.num_samples,
                                    1.0 - self.confidence)
    omega = self.position_overlaps(table, ids, real, candidate_sets)
    smallest = tf.sort(omega, axis=-1)                                    # ascending
    characters = tf.reduce_sum(tf.cast(real & ~self.threat.is_special(ids), tf.float32), 1)
    budget = self.threat.sentence_budget(characters)
    correct = tf.equal(top, tf.cast(labels, tf.int32))
    extra = {}
    for radius in self.radii:
      changes = tf.minimum(float(radius), budget)                          # [B]
      used = tf.range(smallest.shape[-1], dtype=tf.float32)[None, :] < changes[:, None]
      delta = 1.0 - tf.reduce_prod(tf.where(used, smallest, 1.0), -1)
      extra[f"certified{radius}"] = tf.cast(correct & (p_lower - delta > 0.5), tf.float32)
    extra["p_lower"] = p_lower
    # The smoothed classifier predicts the selected class (its vote counts
    # certify it); as logits, a one-hot.
    return tf.one_hot(top, tf.shape(votes)[-1]), extra

  def get_config(self):
    return {"probability": self.probability, "num_samples": self.num_samples,
            "num_selection": self.num_selection, "confidence": self.confidence,
            "radii": list(self.radii), "seed": self.seed, "threat": self.threat.get_config()}
