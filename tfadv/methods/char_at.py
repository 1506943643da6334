"""Character-substitution adversarial training: training on the discrete attack itself (A2T's form).

Yoo & Qi, "Towards Improving Adversarial Training of NLP Models" (A2T,
EMNLP Findings 2021; TextAttack's `Trainer` with `AttackArgs`): each step,
a cheap attack rewrites part of the batch and the model trains on clean and
attacked examples. Here the attack is tfadv's in-graph character attack
(`CharSubstitutionAttack`, greedy: same-pinyin and nearest-embedding
candidates, one gradient pass and one batched verification of `top_k`
candidates per round, `budget` rounds), run on the model as it is at the
step (inference mode: dropout off, nothing of the model's state moves), so
the attacked ids cost one gradient pass and `budget` verification passes
over the attacked share alone: where m divides each replica's batch (always,
in the shipped configs) the attacked examples are gathered and only they are
attacked, so the attack costs `attacked_share` of a whole batch's; otherwise
the whole batch is attacked and the share kept. The positions are the same
on N replicas as on one device either way.

The update: a share `attacked_share` = k/m of the examples, those at
positions p of the global batch with p mod m < k (every other example at
0.5), is replaced by its attacked text (examples the model already gets
wrong stay as they are, as TextAttack skips them), and `inner` (plain training by
default; any embedding method, e.g. `EmbeddingFGM`, for FGM + character AT)
takes its gradients on that batch; with `adversarial_weight` w the clean
batch's loss is added as well: loss = clean + w · (batch with the attacked
share), A2T's `alpha`.

Where this differs from TextAttack's A2T: A2T attacks a fixed share of the
*dataset* once per epoch (`num_train_adv_examples`, from `attack_epoch_interval`)
and appends the adversarial examples to the training set; here every step
attacks its own batch in-graph (no Python, any strategy, XLA), which keeps
the attack on the current model. A2T's warm-up (`num_clean_epochs`) is
`Experiment.adversarial_start_step`.

Example:
>>> method = CharSubstitutionTraining(CharSubstitutionAttack(budget=1), attacked_share=0.5)
>>> # Experiment.method = @CharSubstitutionTraining() in a text config
"""

import fractions
from typing import Optional, Tuple

import gin
import keras
import tensorflow as tf

from tfadv import checks
from tfadv.attacks.char_substitution import CharSubstitutionAttack
from tfadv.errors import SettingError
from tfadv.methods.base import Method, MethodOutput, add_gradients, clean_gradients
from tfadv.models.state import ascent_pass


@gin.configurable
class CharSubstitutionTraining(Method):
  """Trains on batches whose `attacked_share` is attacked by the character attack (module docstring).

  Args:
    attack: the training attack (default: greedy, budget 1, TextAttack's
      budget rule).
    attacked_share: the share of the examples attacked (A2T's
      `num_train_adv_examples` as a fraction), k/m with m <= 64: the
      examples at global batch positions p with p mod m < k.
    adversarial_weight: 0: train on the attacked batch alone; w > 0: the
      clean batch's loss plus w times the attacked batch's (A2T's `alpha`).
    inner: the method that takes the gradients on the attacked batch
      (default `Plain`); e.g. `EmbeddingFGM()` for FGM + character AT.
  """

  name = "char_at"

  def __init__(self, attack: Optional[CharSubstitutionAttack] = None,
               attacked_share: float = 0.5, adversarial_weight: float = 0.0,
               inner: Optional[Method] = None):
    checks.check("CharSubstitutionTraining",
                 attacked_share=(attacked_share, checks.FRACTION),
                 adversarial_weight=(adversarial_weight, checks.NON_NEGATIVE))
    from tfadv.methods.plain import Plain  # pylint: disable=g-import-not-at-top
    self.attack = attack if attack is not None else CharSubstitutionAttack(budget=1)
    self.attacked_share = float(attacked_share)
    share = fractions.Fraction(self.attacked_share).limit_denominator(64)
    if abs(float(share) - self.attacked_share) > 1e-9:
      raise SettingError(
          f"CharSubstitutionTraining.attacked_share = {attacked_share}: must be k/m with "
          f"m <= 64 (the attacked positions repeat every m examples); e.g. {float(share)!r}.")
    self.period = (share.denominator, share.numerator)  # (m, k)
    self.adversarial_weight = float(adversarial_weight)
    self.inner = inner if inner is not None else Plain()
    for attribute in ("batch_replays", "uses_example_ids", "uses_replay_index"):
      if getattr(self.inner, attribute) not in (1, False):
        raise SettingError(
            f"CharSubstitutionTraining.inner = {type(self.inner).__name__}: its "
            f"{attribute} needs the pipeline's per-example or replayed batches; use "
            "an embedding method without them (FGM, output FGM, GP, PGD, FreeLB, R3F).")

  def prepare(self, task, model_dir: Optional[str] = None) -> None:
    """The attack's vocabulary tables (the experiment calls it)."""
    self.attack.prepare(task, model_dir)

  def seed_with(self, run_seed: int) -> None:
    self.inner.seed_with(run_seed)

  def build(self, model: keras.Model, input_shape=None) -> None:
    self.inner.build(model, input_shape=input_shape)

  @property
  def variables(self):
    return self.inner.variables

  def attacked_positions(self, batch: int) -> Optional[Tuple[int, ...]]:
    """The attacked positions of a replica's batch of static size `batch`
    when m divides it (they are then the same on every replica), else None."""
    m, k = self.period
    if batch is None or batch % m:
      return None
    return tuple(p for p in range(batch) if p % m < k)

  def attacked_inputs(self, model, inputs, labels):
    """`inputs` with the token ids of the examples at the attacked positions
    of the global batch attacked, and how many of this replica's examples
    were attacked and broken."""
    ids = inputs[self.attack.token_ids_key]
    per_example = lambda y, logits: keras.losses.sparse_categorical_crossentropy(
        y, tf.cast(logits, tf.float32), from_logits=True)
    positions = self.attacked_positions(ids.shape[0])
    if positions is not None:
      # Only the attacked examples go through the attack.
      index = tf.constant(positions, tf.int32)
      chosen_inputs = {key: tf.gather(value, index) for key, value in inputs.items()}
      chosen_labels = tf.gather(labels, index)
      with ascent_pass(model):
        logits, extra = self.attack.adversarial_outputs(model, chosen_inputs, chosen_labels,
                                                        None, per_example)
      attacked = tf.tensor_scatter_nd_update(ids, index[:, None],
                                             tf.cast(extra["token_ids"], ids.dtype))
      broken = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32),
                            tf.cast(chosen_labels, tf.int32))
      count = tf.constant(float(len(positions)))
    else:
      # Positions in the *global* batch: N replicas attack what one device does.
      batch = tf.shape(ids)[0]
      context = tf.distribute.get_replica_context()
      position = tf.cast(context.replica_id_in_sync_group, tf.int32) * batch + tf.range(batch)
      m, k = self.period
      chosen = position % m < k
      with ascent_pass(model):
        logits, extra = self.attack.adversarial_outputs(model, inputs, labels, None, per_example)
      attacked = tf.where(chosen[:, None], tf.cast(extra["token_ids"], ids.dtype), ids)
      broken = tf.logical_and(chosen, tf.not_equal(
          tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)))
      count = tf.reduce_sum(tf.cast(chosen, tf.float32))
    return ({**inputs, self.attack.token_ids_key: tf.stop_gradient(attacked)},
            count, tf.reduce_sum(tf.cast(broken, tf.float32)))

  def compute_gradients(self, model, loss_fn, inputs, labels, weights) -> MethodOutput:
    inputs = {key: tf.convert_to_tensor(value) for key, value in inputs.items()}
    attacked, share, broken = self.attacked_inputs(model, inputs, labels)
    out = self.inner.compute_gradients(model, loss_fn, attacked, labels, weights)
    metrics = {**out.metrics, "attacked": share, "broken": broken}
    if not self.adversarial_weight:
      return MethodOutput(loss=out.loss, logits=out.logits, gradients=out.gradients,
                          metrics=metrics)
    loss, logits, clean = clean_gradients(model, loss_fn, inputs, labels, weights)
    gradients = [add_gradients(c, a, self.adversarial_weight)
                 for c, a in zip(clean, out.gradients)]
    return MethodOutput(loss=loss, logits=logits, gradients=gradients,
                        metrics={**metrics, "adv_loss": out.loss})

  def get_config(self):
    return {"attacked_share": self.attacked_share,
            "adversarial_weight": self.adversarial_weight,
            "attack": self.attack.get_config(), "inner": type(self.inner).__name__,
            "inner_config": self.inner.get_config()}
