"""Adversarial training on input-space attacks: PGD-K (Madry et al. 2018) and FGSM-RS.

Each step first builds adversarial images with an `InputAttack` (K ascent
passes that need input gradients only), then takes one ordinary
forward/backward pass on them; its gradients are the update. A K-step PGD
step therefore costs about 1 + 2K/3 plain steps, not K + 1. The training loss
and accuracy these methods report are those of the adversarial batch.
"""

from typing import Optional

import gin
import tensorflow as tf

from tfadv import checks

from tfadv.attacks import NORMS, InputAttack
from tfadv.loss_scaling import scaled_gradient
from tfadv.methods.base import Method, MethodOutput


@gin.configurable
class PGDTraining(Method):
  """Trains on PGD adversarial examples of every batch.

  Args:
    epsilon: radius of the threat model's ball.
    step_size: ascent step α.
    num_steps: K.
    norm: "linf" or "l2".
    random_start: start each attack at a random point of the ball.
    clip_min, clip_max: pixel range.
    seed: seed of the random starts (None: the run's seed, `Method.seed_with`;
      each replica draws its own stream).

  Example:
  >>> method = PGDTraining(epsilon=0.1, step_size=0.025, num_steps=7)
  >>> method.build(model)
  >>> out = method.compute_gradients(model, loss_fn, images, labels, weights)
  """

  name = "pgd"

  def __init__(self, epsilon: float = 0.1, step_size: float = 0.025,
               num_steps: int = 7, norm: str = "linf", random_start: bool = True,
               clip_min: float = 0.0, clip_max: float = 1.0, seed: Optional[int] = None):
    checks.check(type(self).__name__, epsilon=(epsilon, checks.NON_NEGATIVE),
                 step_size=(step_size, checks.NON_NEGATIVE),
                 num_steps=(num_steps, checks.AT_LEAST_ONE), norm=(norm, checks.one_of(NORMS)))
    checks.check_interval(type(self).__name__, "clip_min", clip_min, "clip_max", clip_max)
    self.attack = InputAttack(epsilon=epsilon, step_size=step_size,
                              num_steps=num_steps, norm=norm,
                              random_start=random_start, clip_min=clip_min,
                              clip_max=clip_max, training=True)
    self.seed = seed
    self._rng: Optional[tf.random.Generator] = None

  def build(self, model, input_shape=None):
    del model, input_shape
    self._rng = tf.random.Generator.from_seed(self.draw_seed)

  @property
  def variables(self):
    return [self._rng] if self._rng is not None else []

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    images = tf.convert_to_tensor(inputs)
    x_adv = self.attack(model, images, labels, rng=self._rng)
    with tf.GradientTape() as tape:
      adv_logits = model(x_adv, training=True)
      adv_loss = loss_fn(labels, adv_logits, weights)
    gradients = scaled_gradient(tape, adv_loss, model.trainable_variables)
    # The loss and accuracy reported in training are those of the adversarial
    # batch (what Madry's code prints); a clean pass would cost 1/3 step more.
    return MethodOutput(loss=adv_loss, logits=adv_logits, gradients=gradients)

  def get_config(self):
    config = self.attack.get_config()
    for key in ("restarts", "training"):
      config.pop(key)
    return {**config, "seed": self.draw_seed}


@gin.configurable
class FGSMTraining(PGDTraining):
  """FGSM with a random start ("fast is better than free", Wong et al. 2020).

  One ascent step of α = 1.25ε (by default) from a uniform point of the ℓ∞
  ball, projected back; then one training pass on the result.

  Example:
  >>> method = FGSMTraining(epsilon=0.1)  # step_size 0.125
  """

  name = "fgsm"

  def __init__(self, epsilon: float = 0.1, step_size: Optional[float] = None,
               random_start: bool = True, clip_min: float = 0.0,
               clip_max: float = 1.0, seed: Optional[int] = None):
    checks.check("FGSMTraining", epsilon=(epsilon, checks.NON_NEGATIVE),
                 step_size=(step_size, checks.NON_NEGATIVE))
    checks.check_interval("FGSMTraining", "clip_min", clip_min, "clip_max", clip_max)
    super().__init__(epsilon=epsilon,
                     step_size=1.25 * epsilon if step_size is None else step_size,
                     num_steps=1, norm="linf", random_start=random_start,
                     clip_min=clip_min, clip_max=clip_max, seed=seed)
