"""FGSM and PGD in ℓ∞ and ℓ2 on the inputs, for training and evaluation.

Every iterate is projected onto the ε-ball (and the pixel range), not only
the last one. The ascent passes ask the tape for input gradients only, so no
weight gradients are computed.
"""

from typing import Callable, Optional

import gin
import keras
import tensorflow as tf

from tfadv import checks, perturbation
from tfadv.attacks.base import (NORMS, Attack, ascent_direction, cross_entropy, project,
                                random_start)
from tfadv.loss_scaling import scaled_gradient
from tfadv.models.state import ascent_pass
from tfadv.perturbation import per_example

@gin.configurable
class InputAttack(Attack):
  """Projected gradient ascent on the loss, from a clean or random start.

  FGSM is `num_steps=1, step_size=epsilon, random_start=False`; FGSM with a
  random start ("fast is better than free", Wong et al. 2020) is
  `num_steps=1, step_size=1.25 * epsilon, random_start=True`; Madry's PGD is
  `num_steps=K, random_start=True`.

  Args:
    epsilon: radius of the ball (pixels in [0, 1], so 0.1 or 8/255).
    step_size: size of each ascent step (α).
    num_steps: ascent steps K.
    norm: "linf" or "l2".
    random_start: start from a random point of the ball.
    restarts: independent runs; an example counts as broken if any run
      breaks it (the first breaking run's image is returned).
    clip_min, clip_max: the pixel range.
    training: run the model in training mode during the ascent (batch
      statistics, as Madry's and Wong's code do). BatchNorm's moving
      averages are not updated by ascent passes (only the training pass on
      the adversarial batch updates them); every ascent pass draws its own
      dropout masks, and the training pass after the attack draws fresh
      ones (`tfadv.models.state.ascent_pass`).

  Example:
  >>> pgd20 = InputAttack(epsilon=0.1, step_size=0.01, num_steps=20)
  >>> x_adv = pgd20(model, images, labels, rng=tf.random.Generator.from_seed(0))
  """

  def __init__(self, epsilon: float = 0.1, step_size: Optional[float] = None,
               num_steps: int = 1, norm: str = "linf", random_start: bool = False,
               restarts: int = 1, clip_min: float = 0.0, clip_max: float = 1.0,
               training: bool = False):
    checks.check("InputAttack", epsilon=(epsilon, checks.NON_NEGATIVE),
                 step_size=(step_size, checks.NON_NEGATIVE),
                 num_steps=(num_steps, checks.AT_LEAST_ONE), norm=(norm, checks.one_of(NORMS)),
                 restarts=(restarts, checks.AT_LEAST_ONE))
    checks.check_interval("InputAttack", "clip_min", clip_min, "clip_max", clip_max)
    self.epsilon = float(epsilon)
    self.step_size = float(step_size if step_size is not None else epsilon)
    self.num_steps = int(num_steps)
    self.norm = norm
    self.random_start = random_start
    self.restarts = int(restarts)
    self.clip_min = clip_min
    self.clip_max = clip_max
    self.training = training

  def _loss_and_gradient(self, model, loss_fn, x_adv, labels):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(x_adv)
      # Moving statistics stay; dropout seeds move on (fresh masks next pass).
      with ascent_pass(model):
        logits = tf.cast(model(x_adv, training=self.training), tf.float32)
      loss = tf.reduce_sum(loss_fn(labels, logits))
    return logits, scaled_gradient(tape, loss, x_adv)

  def _one_run(self, model, loss_fn, x, labels, rng):
    # A training step under an ε ramp attacks inside the ball in force.
    epsilon, step_size = perturbation.ramped(self.epsilon), perturbation.ramped(self.step_size)
    x_adv = x
    if self.random_start:
      x_adv = project(random_start(x, epsilon, self.norm, rng), x,
                      epsilon, self.norm, self.clip_min, self.clip_max)
    for _ in range(self.num_steps):
      _, gradient = self._loss_and_gradient(model, loss_fn, x_adv, labels)
      x_adv = x_adv + step_size * ascent_direction(gradient, self.norm)
      x_adv = project(x_adv, x, epsilon, self.norm, self.clip_min, self.clip_max)
    return tf.stop_gradient(x_adv)

  def __call__(self, model: keras.Model, x: tf.Tensor, labels: tf.Tensor,
               rng: Optional[tf.random.Generator] = None,
               loss_fn: Optional[Callable] = None) -> tf.Tensor:
    """Adversarial images for `x` (same shape and dtype)."""
    if (self.random_start or self.restarts > 1) and rng is None:
      raise ValueError("A random-start attack needs an rng (tf.random.Generator).")
    loss_fn = loss_fn or cross_entropy
    best = self._one_run(model, loss_fn, x, labels, rng)
    for _ in range(self.restarts - 1):
      # Keep the first image that breaks each example; else try again.
      logits = model(best, training=False)
      broken = tf.not_equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
      candidate = self._one_run(model, loss_fn, x, labels, rng)
      best = tf.where(per_example(broken, x), best, candidate)
    return best

  def get_config(self) -> dict:
    return {"epsilon": self.epsilon, "step_size": self.step_size,
            "num_steps": self.num_steps, "norm": self.norm,
            "random_start": self.random_start, "restarts": self.restarts,
            "clip_min": self.clip_min, "clip_max": self.clip_max,
            "training": self.training}
