"""A character-substitution attack on Chinese text classifiers: homophones and embedding neighbours, HotFlip-guided, verified greedily.

An attack that real input can carry out (unlike a perturbation of the
embeddings): replace at most B characters of a sentence (default 2, and at
most `max_fraction` = 10% of its characters) by

- characters with the same pinyin, tones ignored (every reading of a
  polyphonic character; `pypinyin`'s bundled dictionary, offline), and
- the k nearest characters in the model's own token-embedding table
  (Euclidean distance, recomputed from the weights being evaluated),

only CJK characters of the model's vocabulary, never special tokens,
punctuation, digits or Latin letters, each position changed at most once
(TextAttack's `RepeatModification`). The search follows Wang et al. 2020
("Towards Evaluating the Robustness of Chinese BERT Classifiers": the
substitution guided by the embedding gradient) and HotFlip (Ebrahimi et al.
2018): one backward pass gives g = ∂L/∂(embedding output), and the
first-order gain of putting character c at position i is (E[c] − E[x_i])·g_i;
each round verifies the `top_k` best (position, character) pairs in one
batched forward pass and keeps the one that raises the loss most, if any
does. An example stops when its prediction flips (success), when no
candidate raises its loss, or when its budget is spent. Examples the model
already gets wrong are not attacked (TextAttack's "skipped").

Metrics, as TextAttack defines them (`textattack/metrics/attack_metrics`):
accuracy under attack = failed / total (the trainer's `accuracy_<name>`),
attack success rate = successful / (successful + failed)
(`success_rate_<name>`), mean characters changed over successful attacks
(`<name>_changed`), mean model queries over attacked examples
(`<name>_queries`: 1 for the clean prediction, plus one per verified
candidate; the gradient pass of a round re-runs a text already queried).

Everything is one in-graph computation with static shapes (`budget` rounds,
`top_k` candidates each), batched, deterministic, under the trainer's
strategy. The pinyin table depends on the vocabulary only: it is built once
and cached in the model dir (`char_substitution_pinyin.npz`).
"""

import hashlib
import io
import os
from typing import List, Optional, Sequence

import gin
import numpy as np
import tensorflow as tf

from tfadv import checks
from tfadv.attacks.base import Attack
from tfadv.data.vocab import SPECIAL_TOKENS, _is_cjk
from tfadv.errors import SettingError
from tfadv.loss_scaling import scaled_gradient

CACHE = "char_substitution_pinyin.npz"


def attackable(vocabulary: Sequence[str]) -> np.ndarray:
  """[V] bool: the tokens that are one CJK character (positions that may change,
  and the characters they may become)."""
  return np.array([len(t) == 1 and _is_cjk(t) and t not in SPECIAL_TOKENS
                   for t in vocabulary], bool)


def pinyin_table(vocabulary: Sequence[str], max_candidates: int) -> np.ndarray:
  """[V, max_candidates] int32: for each CJK character, the other CJK
  characters of `vocabulary` sharing a toneless reading, in vocabulary order
  (a frequency-ordered vocabulary puts common characters first); −1 pads."""
  from pypinyin import Style, pinyin  # pylint: disable=g-import-not-at-top
  allowed = attackable(vocabulary)
  readings, by_reading = {}, {}
  for index, token in enumerate(vocabulary):
    if allowed[index]:
      sounds = set(pinyin(token, style=Style.NORMAL, heteronym=True)[0])
      sounds = {s for s in sounds if s.isalpha() and s.isascii()}  # a reading, not the char
      readings[index] = sounds
      for sound in sounds:
        by_reading.setdefault(sound, []).append(index)
  table = np.full((len(vocabulary), max_candidates), -1, np.int32)
  for index, sounds in readings.items():
    same = sorted({other for s in sounds for other in by_reading[s]} - {index})
    table[index, :min(len(same), max_candidates)] = same[:max_candidates]
  return table


def cached_pinyin_table(vocabulary: Sequence[str], max_candidates: int,
                        model_dir: Optional[str]) -> np.ndarray:
  """`pinyin_table`, read from / written to `model_dir` when given (keyed by the
  vocabulary's hash and `max_candidates`)."""
  key = hashlib.sha256(("\n".join(vocabulary) + f"\n{max_candidates}").encode()).hexdigest()
  path = os.path.join(model_dir, CACHE) if model_dir else None
  if path and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, "rb") as f:
      saved = np.load(io.BytesIO(f.read()))
    if str(saved["key"]) == key:
      return saved["table"]
  table = pinyin_table(vocabulary, max_candidates)
  if path:  # local or gs://
    buffer = io.BytesIO()
    np.savez(buffer, key=key, table=table)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue())
  return table


def _detokenize(ids, vocabulary) -> str:
  """Characters of a token-id row, special tokens dropped (WordPiece `##` joined)."""
  tokens = [vocabulary[i] for i in ids if vocabulary[i] not in SPECIAL_TOKENS]
  return "".join(t[2:] if t.startswith("##") else t for t in tokens)


BUDGET_RULES = ("ceil", "floor")
SEARCHES = ("greedy", "beam")


@gin.configurable
class CharSubstitutionAttack(Attack):
  """Greedy character substitutions (homophones + embedding neighbours), HotFlip-guided.

  Args:
    budget: B, the most characters changed per sentence.
    max_fraction: and at most this share of the sentence's characters
      (its real tokens other than special tokens), rounded by `budget_rule`.
    budget_rule: "ceil", TextAttack's `MaxWordsPerturbed` rule: at most
      max(ceil(max_fraction · n), 1) of n characters, so every sentence is
      attacked; or "floor": floor(max_fraction · n), which leaves sentences
      under 10 characters unattacked (counted as held) and gives sentences
      under 20 one change under "B = 2". The committed CLUE and demo tables
      were measured with "floor" (configs/base/clue.gin, configs/demo.gin
      bind it).
    pinyin_candidates: same-pinyin candidates per character.
    embedding_candidates: k nearest characters in the token-embedding table.
    top_k: (position, character) pairs verified per round (one batched
      forward pass of top_k texts per example).
    token_ids_key, padding_mask_key: the model's inputs.
    layer_name: the token-embedding layer (keras-hub BERT: `token_embedding`).
    search: "greedy" (above: cheap, for training and quick checks) or
      "beam", the tight search under the same threat model (same candidates,
      budget and constraints): round 1 verifies every single substitution
      (all positions × all candidates, batched position by position); each
      later round keeps the `beam_width` texts of highest loss and verifies
      every further substitution of each. The greedy search runs first, and
      the beam search attacks only the examples it left standing, so an
      example counts as broken when either breaks it and "beam" never
      reports higher accuracy than "greedy" on the same examples; where
      greedy broke an example, its text and its count of changed characters
      are kept (the beam might have needed fewer). `queries` counts both
      searches' forward passes.
    beam_width: texts kept between rounds of the "beam" search.
    beam_examples: examples the beam search attacks at a time (gathered
      from greedy's survivors, so its cost follows how many survive).

  Before use it needs the model's vocabulary: `prepare(task, model_dir)`
  (the experiment calls it) or `set_vocabulary(tokens)`.

  Example:
  >>> attack = CharSubstitutionAttack(budget=2)
  >>> # Experiment.eval_attacks = {"sub2": @CharSubstitutionAttack()} in a text config
  """

  per_example_metrics = {"changed": "successful", "queries": "attacked"}

  def __init__(self, budget: int = 2, max_fraction: float = 0.1, budget_rule: str = "ceil",
               pinyin_candidates: int = 8, embedding_candidates: int = 8,
               top_k: int = 8, token_ids_key: str = "token_ids",
               padding_mask_key: str = "padding_mask",
               layer_name: str = "token_embedding", search: str = "greedy",
               beam_width: int = 10, beam_examples: int = 4):
    checks.check("CharSubstitutionAttack", budget=(budget, checks.AT_LEAST_ONE),
                 max_fraction=(max_fraction, checks.FRACTION),
                 pinyin_candidates=(pinyin_candidates, checks.NON_NEGATIVE_INT),
                 embedding_candidates=(embedding_candidates, checks.NON_NEGATIVE_INT),
                 top_k=(top_k, checks.AT_LEAST_ONE),
                 budget_rule=(budget_rule, checks.one_of(BUDGET_RULES)),
                 search=(search, checks.one_of(SEARCHES)),
                 beam_width=(beam_width, checks.AT_LEAST_ONE),
                 beam_examples=(beam_examples, checks.AT_LEAST_ONE))
    if pinyin_candidates + embedding_candidates < 1:
      raise SettingError("CharSubstitutionAttack.pinyin_candidates = 0 and "
                         "embedding_candidates = 0: expected at least one candidate.")
    self.budget = int(budget)
    self.max_fraction = float(max_fraction)
    self.budget_rule = budget_rule
    self.pinyin_candidates = int(pinyin_candidates)
    self.embedding_candidates = int(embedding_candidates)
    self.top_k = int(top_k)
    self.token_ids_key = token_ids_key
    self.padding_mask_key = padding_mask_key
    self.layer_name = layer_name
    self.search = search
    self.beam_width = int(beam_width)
    self.beam_examples = int(beam_examples)
    self._allowed = self._special = self._pinyin = None
    self._hook = None

  def sentence_budget(self, characters: tf.Tensor) -> tf.Tensor:
    """The most characters `budget_rule` lets change in sentences of
    `characters` characters (float), before the cap B."""
    share = self.max_fraction * characters
    if self.budget_rule == "floor":
      return tf.floor(share + 1e-6)
    return tf.maximum(tf.math.ceil(share - 1e-6), tf.minimum(characters, 1.0))

  def prepare(self, task, model_dir: Optional[str] = None) -> None:
    self.set_vocabulary(task.vocabulary(), model_dir)

  def set_vocabulary(self, vocabulary: List[str], model_dir: Optional[str] = None,
                     pinyin: Optional[np.ndarray] = None) -> None:
    """Builds the candidate tables; `pinyin` overrides the same-pinyin table
    ([V, P] int32, −1 padded; tests)."""
    vocabulary = list(vocabulary)
    self._allowed = tf.constant(attackable(vocabulary))
    self._special = tf.constant([t in SPECIAL_TOKENS for t in vocabulary])
    if pinyin is None:
      pinyin = cached_pinyin_table(vocabulary, self.pinyin_candidates, model_dir)
    self._pinyin = tf.constant(pinyin, tf.int32)

  def substitutable(self, ids):
    """Whether each id may be replaced or replace another: a CJK character
    of the vocabulary, not a special token (`attackable`)."""
    return tf.gather(self._allowed, ids)

  def is_special(self, ids):
    """Whether each id is a special token ([CLS], [SEP], [PAD], ...), which
    does not count as one of a sentence's characters."""
    return tf.gather(self._special, ids)

  def candidates(self, table, ids):
    """[B, L, P + k] candidate ids (−1: none) of every position: its
    same-pinyin characters, then its `embedding_candidates` nearest rows of
    the token-embedding `table` (substitutable ones only)."""
    same_sound = tf.gather(self._pinyin, ids)
    if self.embedding_candidates == 0:
      return same_sound
    vectors = tf.gather(table, ids)  # [B, L, H]
    # ‖E_c − E_x‖² ordering = ‖E_c‖² − 2 E_c·E_x (‖E_x‖² is the same for every c).
    distance = (tf.reduce_sum(tf.square(table), -1)[None, None, :]
                - 2.0 * tf.einsum("blh,vh->blv", vectors, table))
    vocabulary = tf.shape(table)[0]
    own = tf.one_hot(ids, vocabulary, on_value=True, off_value=False)
    distance = tf.where(tf.logical_and(self._allowed[None, None, :], ~own), distance,
                        np.inf)
    _, nearest = tf.math.top_k(-distance, k=self.embedding_candidates)
    usable = self.substitutable(nearest)
    # A neighbour already among the same-sound candidates is not tried twice.
    repeated = tf.reduce_any(nearest[..., :, None] == same_sound[..., None, :], -1)
    nearest = tf.where(tf.logical_and(usable, ~repeated), nearest, -1)
    return tf.concat([same_sound, tf.cast(nearest, tf.int32)], -1)

  def _forward(self, model, inputs, ids):
    return tf.cast(model({**inputs, self.token_ids_key: ids}, training=False), tf.float32)

  def adversarial_logits(self, model, inputs, labels, rng, loss_fn):
    return self.adversarial_outputs(model, inputs, labels, rng, loss_fn)[0]

  def adversarial_outputs(self, model, inputs, labels, rng, loss_fn):
    """(logits of the attacked texts, {"changed", "queries", "token_ids"})."""
    del rng  # deterministic
    from tfadv.models.hooks import EmbeddingOutputHook  # pylint: disable=g-import-not-at-top
    if self._pinyin is None:
      raise ValueError("CharSubstitutionAttack has no vocabulary: the experiment calls "
                       "prepare(task, model_dir); outside one call set_vocabulary(tokens).")
    if self._hook is None or self._hook.model is not model:
      self._hook = EmbeddingOutputHook(model, self.layer_name)
    hook = self._hook
    table = tf.cast(tf.convert_to_tensor(hook.layer.embeddings), tf.float32)
    inputs = {key: tf.convert_to_tensor(value) for key, value in inputs.items()}
    ids = tf.cast(inputs[self.token_ids_key], tf.int32)
    real = tf.cast(inputs[self.padding_mask_key], tf.bool)
    batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
    characters = tf.reduce_sum(tf.cast(
        tf.logical_and(real, ~self.is_special(ids)), tf.float32), 1)
    budget = tf.minimum(float(self.budget), self.sentence_budget(characters))
    position_ok = tf.logical_and(real, self.substitutable(ids))
    candidates = self.candidates(table, ids)  # fixed by the original text
    slots = candidates.shape[-1]

    logits = self._forward(model, inputs, ids)
    loss = loss_fn(labels, logits)
    labels = tf.cast(labels, tf.int32)
    active = tf.logical_and(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                            budget > 0)
    clean_active = active
    queries = tf.ones([batch], tf.float32)
    changed = tf.zeros([batch, length], tf.bool)
    current = ids
    k = self.top_k
    for round_ in range(self.budget):
      zero = tf.zeros([batch, length, hook.output_dim])
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(zero)
        with hook.adding(zero):
          round_loss = tf.reduce_sum(loss_fn(labels, self._forward(model, inputs, current)))
      # Scaled as every evaluation attack's (float16: small gradients underflow);
      # the gains rank candidates, which no positive scale changes.
      gradient = tf.cast(scaled_gradient(tape, round_loss, zero), tf.float32)
      here = tf.gather(table, current)
      gain = tf.einsum("blch,blh->blc", tf.gather(table, tf.maximum(candidates, 0))
                       - here[:, :, None, :], gradient)
      valid = (tf.logical_and(candidates >= 0, position_ok[..., None])
               & ~changed[..., None] & (candidates != current[..., None]))
      gain = tf.reshape(tf.where(valid, gain, -np.inf), [batch, length * slots])
      best_gain, pick = tf.math.top_k(gain, k=k)
      position = pick // slots
      character = tf.gather(tf.reshape(candidates, [batch, -1]), pick, batch_dims=1)
      tried = tf.math.is_finite(best_gain)  # [B, k]
      texts = tf.where(tf.one_hot(position, length, on_value=True, off_value=False),
                       character[..., None], current[:, None, :])  # [B, k, L]
      tiled = {key: tf.repeat(value, k, axis=0) for key, value in inputs.items()}
      tried_logits = tf.reshape(
          self._forward(model, tiled, tf.reshape(texts, [batch * k, length])),
          [batch, k, -1])
      tried_loss = tf.reshape(loss_fn(tf.repeat(labels, k), tf.reshape(
          tried_logits, [batch * k, -1])), [batch, k])
      tried_loss = tf.where(tried, tried_loss, -np.inf)
      best = tf.argmax(tried_loss, -1, output_type=tf.int32)
      best_loss = tf.gather(tried_loss, best, batch_dims=1)
      running = tf.logical_and(active, float(round_) < budget)
      queries += tf.where(running, tf.reduce_sum(tf.cast(tried, tf.float32), -1), 0.0)
      keep = tf.logical_and(running, best_loss > loss)
      current = tf.where(keep[:, None], tf.gather(texts, best, batch_dims=1), current)
      changed = tf.logical_or(changed, tf.logical_and(keep[:, None], tf.one_hot(
          tf.gather(position, best, batch_dims=1), length, on_value=True, off_value=False)))
      logits = tf.where(keep[:, None], tf.gather(tried_logits, best, batch_dims=1), logits)
      loss = tf.where(keep, best_loss, loss)
      flipped = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
      active = tf.logical_and(keep, ~flipped)
    greedy = logits, {"changed": tf.reduce_sum(tf.cast(changed, tf.float32), 1),
                      "queries": queries, "token_ids": current}
    if self.search == "greedy":
      return greedy
    return self._beam(model, inputs, labels, loss_fn, ids, candidates, position_ok,
                      budget, clean_active, greedy)

  def _beam(self, model, inputs, labels, loss_fn, ids, candidates, position_ok, budget,
            active, greedy):
    """The "beam" search (class docstring) on the examples the greedy search
    (`greedy`, its result) left standing, `beam_examples` at a time, then the
    per-example worst case of the two."""
    greedy_logits, extra = greedy
    greedy_broken = tf.not_equal(tf.argmax(greedy_logits, -1, output_type=tf.int32), labels)
    need = tf.logical_and(active, ~greedy_broken)
    batch = tf.shape(ids)[0]
    chunk = self.beam_examples
    # Greedy's survivors first; chunks of `chunk` of them (static shapes, a
    # dynamic count: XLA compiles it). A chunk's slots past the survivors
    # repeat an example, inactive: they add nothing below.
    order = tf.argsort(tf.cast(~need, tf.int32), stable=True)
    survivors = tf.reduce_sum(tf.cast(need, tf.int32))
    per_example = (tf.zeros_like(ids), tf.zeros([batch], tf.float32),
                   tf.zeros([batch], tf.float32), tf.zeros([batch], tf.float32))

    def one_chunk(k, found_delta, found_changed, broken, queries):
      slot = k * chunk + tf.range(chunk)
      index = tf.gather(order, tf.minimum(slot, batch - 1))
      take = lambda value: tf.gather(value, index)
      part = self._beam_examples(
          model, {key: take(value) for key, value in inputs.items()}, take(labels), loss_fn,
          take(ids), take(candidates), take(position_ok), take(budget),
          tf.logical_and(take(need), slot < survivors))
      at = index[:, None]
      return (k + 1,
              tf.tensor_scatter_nd_add(found_delta, at, part[0] - take(ids)),
              tf.tensor_scatter_nd_add(found_changed, at, part[1]),
              tf.tensor_scatter_nd_add(broken, at, tf.cast(part[2], tf.float32)),
              tf.tensor_scatter_nd_add(queries, at, part[3]))

    _, found_delta, found_changed, broken, queries = tf.while_loop(
        lambda k, *_: k * chunk < survivors, one_chunk, (tf.constant(0), *per_example))
    found = ids + found_delta
    broken = broken > 0
    use_beam = broken & ~(greedy_broken & (extra["changed"] <= found_changed))
    final = tf.where(use_beam[:, None], found, extra["token_ids"])
    logits = tf.where(use_beam[:, None], self._forward(model, inputs, final), greedy_logits)
    return logits, {"changed": tf.where(use_beam, found_changed, extra["changed"]),
                    "queries": extra["queries"] + queries, "token_ids": final}

  def _beam_examples(self, model, inputs, labels, loss_fn, ids, candidates, position_ok,
                     budget, active):
    """The beam search on these examples (those `active`): (the breaking
    text, or the input where none; characters it changed; broken; queries);
    inactive examples come back unchanged, with zeros."""
    batch, length = tf.shape(ids)[0], ids.shape[1]
    slots = candidates.shape[-1]
    # Past the batch's last attackable position nothing can change: skipped.
    used = tf.reduce_max(tf.where(position_ok, tf.range(1, length + 1)[None, :], 0))
    beam = ids[:, None, :]                      # [B, w, L], w = 1 in round 1
    beam_valid = active[:, None]
    beam_changed = tf.zeros_like(beam, tf.bool)
    broken = tf.zeros([batch], tf.bool)
    found = ids                                  # the breaking text, where one is found
    found_changed = tf.zeros([batch], tf.float32)
    queries = tf.zeros([batch], tf.float32)
    for round_ in range(self.budget):
      width = beam.shape[1]
      ok = beam_valid & (float(round_) < budget)[:, None] & ~broken[:, None]   # [B, w]

      def at_position(i, beam=beam, ok=ok, beam_changed=beam_changed, width=width):
        """Loss and flip of every candidate at position i of every beam text."""
        options = candidates[:, i, :]                                        # [B, S]
        here = tf.one_hot(i, length, on_value=True, off_value=False)          # [L]
        texts = tf.where(here, options[:, None, :, None], beam[:, :, None, :])  # [B, w, S, L]
        valid = (ok[:, :, None] & (options >= 0)[:, None, :]
                 & position_ok[:, i][:, None, None] & ~beam_changed[:, :, i][:, :, None]
                 & (options[:, None, :] != beam[:, :, i][:, :, None]))
        many = width * slots
        tiled = {key: tf.repeat(value, many, axis=0) for key, value in inputs.items()}
        logits = self._forward(model, tiled, tf.reshape(texts, [-1, length]))
        loss = tf.reshape(loss_fn(tf.repeat(labels, many), logits), [batch, width, slots])
        flip = tf.reshape(tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32),
                                       tf.repeat(labels, many)), [batch, width, slots])
        return tf.where(valid, loss, -np.inf), tf.logical_and(flip, valid)

      def at_or_after_the_last(i, at_position=at_position, width=width):
        # Every position, a static count (XLA); those past the last
        # attackable one cost nothing.
        return tf.cond(i < used, lambda: at_position(i), lambda: (
            tf.fill([batch, width, slots], -np.inf), tf.zeros([batch, width, slots], tf.bool)))

      loss, flip = tf.map_fn(at_or_after_the_last, tf.range(length), parallel_iterations=1,
                             fn_output_signature=(tf.TensorSpec(None, tf.float32),
                                                  tf.TensorSpec(None, tf.bool)))
      loss = tf.reshape(tf.transpose(loss, [1, 2, 0, 3]), [batch, -1])   # [B, w·L·S]
      flip = tf.reshape(tf.transpose(flip, [1, 2, 0, 3]), [batch, -1])
      queries += tf.reduce_sum(tf.cast(tf.math.is_finite(loss), tf.float32), -1)

      def text_of(index, beam=beam, beam_changed=beam_changed):
        """Beam text `index // (L·S)` with position `index // S % L` set to its
        candidate `index % S`, and its changed positions."""
        source, position, slot = index // (length * slots), index // slots % length, index % slots
        chosen = tf.gather(beam, source, batch_dims=1)
        character = tf.gather(tf.gather(candidates, position, batch_dims=1), slot, batch_dims=1)
        here = tf.one_hot(position, length, on_value=True, off_value=False)
        changed = tf.logical_or(tf.gather(beam_changed, source, batch_dims=1), here)
        return tf.where(here, character[..., None], chosen), changed

      # A text that flips the prediction: the one of highest loss among them.
      flipping = tf.reduce_any(flip, -1) & ~broken
      text, _ = text_of(tf.argmax(tf.where(flip, loss, -np.inf), -1, output_type=tf.int32))
      found = tf.where(flipping[:, None], text, found)
      found_changed = tf.where(flipping, float(round_ + 1), found_changed)
      broken = broken | flipping
      if round_ + 1 < self.budget:
        keep = min(self.beam_width, width * length * slots)
        top_loss, top = tf.math.top_k(loss, k=keep)                         # [B, W]
        beam, beam_changed = tf.map_fn(
            lambda j: text_of(top[:, j]), tf.range(keep), parallel_iterations=1,
            fn_output_signature=(tf.TensorSpec(None, tf.int32), tf.TensorSpec(None, tf.bool)))
        beam = tf.transpose(beam, [1, 0, 2])
        beam_changed = tf.transpose(beam_changed, [1, 0, 2])
        beam_valid = tf.math.is_finite(top_loss)
    return found, found_changed, broken, queries

  def examples(self, model, task, arrays, count: int, batch_size: int = 32):
    """The first `count` examples of `arrays` (a split's rows) attacked, as dicts
    for a reader: original and adversarial text, label, prediction before and
    after, characters changed, whether the attack succeeded (skipped when the
    clean prediction was already wrong)."""
    vocabulary, names = task.vocabulary(), task.label_names
    attack = tf.function(lambda inputs, labels: self.adversarial_outputs(
        model, inputs, labels, None, task.per_example_loss))
    rows = []
    for start in range(0, min(count, len(arrays["label"])), batch_size):
      batch = {k: v[start:min(start + batch_size, count)] for k, v in arrays.items()}
      inputs, labels_of = task.split_batch(batch)
      inputs = {k: tf.convert_to_tensor(v) for k, v in inputs.items()}
      labels = tf.convert_to_tensor(labels_of)
      clean = tf.argmax(model(inputs, training=False), -1).numpy()
      logits, extra = attack(inputs, labels)
      after = tf.argmax(logits, -1).numpy()
      original = inputs[self.token_ids_key].numpy()
      adversarial = extra["token_ids"].numpy()
      real = inputs[self.padding_mask_key].numpy().astype(bool)
      for n in range(len(original)):
        label = int(labels_of[n])
        rows.append({
            "text": _detokenize(original[n][real[n]], vocabulary),
            "adversarial": _detokenize(adversarial[n][real[n]], vocabulary),
            "label": names[label], "prediction": names[int(clean[n])],
            "prediction_after": names[int(after[n])],
            "changed": int(extra["changed"].numpy()[n]),
            "result": ("skipped" if clean[n] != label else
                       "successful" if after[n] != label else "failed")})
    return rows

  def get_config(self) -> dict:
    return {"budget": self.budget, "max_fraction": self.max_fraction,
            "budget_rule": self.budget_rule, "search": self.search,
            "beam_width": self.beam_width, "beam_examples": self.beam_examples,
            "pinyin_candidates": self.pinyin_candidates,
            "embedding_candidates": self.embedding_candidates, "top_k": self.top_k,
            "token_ids_key": self.token_ids_key, "padding_mask_key": self.padding_mask_key,
            "layer_name": self.layer_name}
