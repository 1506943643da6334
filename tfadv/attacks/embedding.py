"""PGD on a text model's embedding outputs: the embedding-space evaluation attack."""

from typing import Optional

import gin
import tensorflow as tf

from tfadv import checks, perturbation
from tfadv.attacks.base import Attack
from tfadv.loss_scaling import scaled_gradient

@gin.configurable
class EmbeddingOutputAttack(Attack):
  """PGD-K on each example's embedding outputs (ℓ2 ball of radius ε, padding masked).

  The evaluation counterpart of `EmbeddingOutputPGD`: δ⁰ a uniform point of
  each example's ball on its real tokens (or 0), then K steps
  δ ← Π_ε(δ + α·g_i/‖g_i‖₂) with g = ∂L/∂δ in inference mode, and the logits
  at e + δᴷ. The random start comes from the trainer's evaluation generator,
  which restarts from a fixed seed at every evaluation.

  Example:
  >>> attack = EmbeddingOutputAttack(epsilon=1.0, num_steps=5)
  >>> # Experiment.eval_attacks = {"pgd5": @EmbeddingOutputAttack()} in a text config
  """

  def __init__(self, epsilon: float = 1.0, step_size: Optional[float] = None,
               num_steps: int = 5, random_start: bool = True,
               layer_name: str = "token_embedding",
               padding_mask_key: Optional[str] = "padding_mask"):
    checks.check("EmbeddingOutputAttack", epsilon=(epsilon, checks.NON_NEGATIVE),
                 step_size=(step_size, checks.NON_NEGATIVE),
                 num_steps=(num_steps, checks.AT_LEAST_ONE))
    self.epsilon = float(epsilon)
    self.step_size = float(step_size if step_size is not None else 2.5 * epsilon / num_steps)
    self.num_steps = int(num_steps)
    self.random_start = random_start
    self.layer_name = layer_name
    self.padding_mask_key = padding_mask_key
    self._hook = None

  def adversarial_logits(self, model, inputs, labels, rng, loss_fn):
    from tfadv.models.hooks import EmbeddingOutputHook  # pylint: disable=g-import-not-at-top
    if self._hook is None or self._hook.model is not model:
      self._hook = EmbeddingOutputHook(model, self.layer_name)
    hook = self._hook
    mask = perturbation.token_mask(inputs, self.padding_mask_key, type(self).__name__)
    shape = tf.concat([tf.shape(mask)[:2], [hook.output_dim]], 0)
    if self.random_start:
      delta = perturbation.random_start(shape, self.epsilon, "l2", rng, mask=mask)
    else:
      delta = tf.zeros(shape)
    for _ in range(self.num_steps):
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(delta)
        with hook.adding(delta * mask):
          logits = tf.cast(model(inputs, training=False), tf.float32)
        loss = tf.reduce_sum(loss_fn(labels, logits))
      gradient = scaled_gradient(tape, loss, delta)
      delta = perturbation.project(
          delta + self.step_size * perturbation.normalize(gradient * mask),
          self.epsilon) * mask
    with hook.adding(tf.stop_gradient(delta)):
      return model(inputs, training=False)

  def get_config(self) -> dict:
    return {"epsilon": self.epsilon, "step_size": self.step_size,
            "num_steps": self.num_steps, "random_start": self.random_start,
            "layer_name": self.layer_name, "padding_mask_key": self.padding_mask_key}
