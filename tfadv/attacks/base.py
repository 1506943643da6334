"""The attack contract and the helpers every input attack shares.

An attack maps a batch to adversarial logits (`Attack.adversarial_outputs`);
input-space attacks return adversarial inputs from `__call__`. Randomness
(random starts, restarts) comes from a `tf.random.Generator` the caller owns:
created under a strategy's scope it gives each replica its own stream, and it
is checkpointable, so a resumed run draws what an uninterrupted one would have.
"""

import keras
import tensorflow as tf

from tfadv import perturbation


NORMS = perturbation.NORMS


def project(x_adv, x, epsilon, norm, clip_min=0.0, clip_max=1.0):
  """Projects `x_adv` onto the ε-ball around `x`, then onto the pixel range."""
  delta = perturbation.project(x_adv - x, epsilon, norm)
  return tf.clip_by_value(x + delta, clip_min, clip_max)


def ascent_direction(gradient, norm):
  """The steepest-ascent unit step for the norm: sign(g) or g/‖g‖₂."""
  return perturbation.normalize(gradient, norm)


def random_start(x, epsilon, norm, rng: tf.random.Generator):
  """A uniform point of the ℓ∞ ball, or a random direction at radius U(0, ε) for ℓ2."""
  return x + perturbation.random_start(tf.shape(x), epsilon, norm, rng,
                                       radius="uniform", dtype=x.dtype)


class Attack:
  """An evaluation attack: `adversarial_logits` of a batch under the attack.

  Input-space attacks return adversarial inputs from `__call__`; attacks on
  a model's internals (`EmbeddingOutputAttack`) return the logits directly.
  The trainer calls `adversarial_outputs` for either.

  An attack that reports more than accuracy (`tfadv.char_substitution`)
  returns per-example values from `adversarial_outputs` and names them in
  `per_example_metrics` ({name: "successful" | "attacked"}: the examples the
  value is averaged over, as TextAttack's metrics do); the trainer then also
  reports `success_rate_<attack>` = broken / attacked (attacked = correct
  clean). `prepare(task, model_dir)` runs once before the model is built
  (e.g. tables that depend on the task's vocabulary).
  """

  per_example_metrics = {}

  def prepare(self, task, model_dir=None) -> None:
    del task, model_dir

  def adversarial_logits(self, model, inputs, labels, rng, loss_fn):
    adversarial = self(model, inputs, labels, rng=rng, loss_fn=loss_fn)
    return model(adversarial, training=False)

  def adversarial_outputs(self, model, inputs, labels, rng, loss_fn):
    """(adversarial logits, {metric: per-example value})."""
    return self.adversarial_logits(model, inputs, labels, rng, loss_fn), {}


def attack_outputs(attack, model, inputs, labels, rng, loss_fn):
  """`attack.adversarial_outputs(...)`, also for an attack written to the older,
  smaller contract (only `adversarial_logits`; no metrics of its own)."""
  if hasattr(attack, "adversarial_outputs"):  # every `Attack`
    return attack.adversarial_outputs(model, inputs, labels, rng, loss_fn)
  return attack.adversarial_logits(model, inputs, labels, rng, loss_fn), {}


def cross_entropy(labels, logits):
  """Per-example cross-entropy of logits (the attacks' default loss)."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
