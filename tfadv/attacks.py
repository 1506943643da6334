"""Input-space attacks: FGSM and PGD in ℓ∞ and ℓ2, used for training and evaluation.

An attack maps a batch of images in [clip_min, clip_max] to adversarial
images inside the ε-ball around them (and inside the pixel range). Every
iterate is projected, not only the last one. The ascent passes ask the tape
for input gradients only, so no weight gradients are computed.

Randomness (random starts, restarts) comes from a `tf.random.Generator` the
caller owns: created under a strategy's scope it gives each replica its own
stream, and it is checkpointable, so a resumed run draws what an
uninterrupted one would have.
"""

from typing import Callable, Optional

import gin
import keras
import tensorflow as tf

NORMS = ("linf", "l2")


def _per_example_norm(x):
  axes = list(range(1, len(x.shape)))
  return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


def project(x_adv, x, epsilon, norm, clip_min=0.0, clip_max=1.0):
  """Projects `x_adv` onto the ε-ball around `x`, then onto the pixel range."""
  delta = x_adv - x
  if norm == "linf":
    delta = tf.clip_by_value(delta, -epsilon, epsilon)
  else:
    delta = delta * tf.minimum(1.0, epsilon / (_per_example_norm(delta) + 1e-12))
  return tf.clip_by_value(x + delta, clip_min, clip_max)


def ascent_direction(gradient, norm):
  """The steepest-ascent unit step for the norm: sign(g) or g/‖g‖₂."""
  if norm == "linf":
    return tf.sign(gradient)
  return gradient / (_per_example_norm(gradient) + 1e-12)


def random_start(x, epsilon, norm, rng: tf.random.Generator):
  """A uniform point of the ℓ∞ ball, or a random direction at radius U(0, ε)·ε for ℓ2."""
  if norm == "linf":
    return x + rng.uniform(tf.shape(x), -epsilon, epsilon, dtype=x.dtype)
  direction = rng.normal(tf.shape(x), dtype=x.dtype)
  direction /= _per_example_norm(direction) + 1e-12
  radius = rng.uniform(tf.concat([tf.shape(x)[:1], tf.ones([len(x.shape) - 1], tf.int32)], 0),
                       0.0, epsilon, dtype=x.dtype)
  return x + radius * direction


@gin.configurable
class InputAttack:
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
      statistics, as Madry's and Wong's code do); its state updates
      (BatchNorm moving averages, seeds) are discarded.

  Example:
  >>> pgd20 = InputAttack(epsilon=0.1, step_size=0.01, num_steps=20)
  >>> x_adv = pgd20(model, images, labels, rng=tf.random.Generator.from_seed(0))
  """

  def __init__(self, epsilon: float = 0.1, step_size: Optional[float] = None,
               num_steps: int = 1, norm: str = "linf", random_start: bool = False,
               restarts: int = 1, clip_min: float = 0.0, clip_max: float = 1.0,
               training: bool = False):
    if norm not in NORMS:
      raise ValueError(f"InputAttack.norm={norm!r}; expected one of {NORMS}.")
    if num_steps < 1 or restarts < 1:
      raise ValueError("InputAttack needs num_steps >= 1 and restarts >= 1.")
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
      # State updates of the attack's forward passes are thrown away.
      with keras.StatelessScope():
        logits = tf.cast(model(x_adv, training=self.training), tf.float32)
      loss = tf.reduce_sum(loss_fn(labels, logits))
    return logits, tape.gradient(loss, x_adv)

  def _one_run(self, model, loss_fn, x, labels, rng):
    x_adv = x
    if self.random_start:
      x_adv = project(random_start(x, self.epsilon, self.norm, rng), x,
                      self.epsilon, self.norm, self.clip_min, self.clip_max)
    for _ in range(self.num_steps):
      _, gradient = self._loss_and_gradient(model, loss_fn, x_adv, labels)
      x_adv = x_adv + self.step_size * ascent_direction(gradient, self.norm)
      x_adv = project(x_adv, x, self.epsilon, self.norm, self.clip_min, self.clip_max)
    return tf.stop_gradient(x_adv)

  def __call__(self, model: keras.Model, x: tf.Tensor, labels: tf.Tensor,
               rng: Optional[tf.random.Generator] = None,
               loss_fn: Optional[Callable] = None) -> tf.Tensor:
    """Adversarial images for `x` (same shape and dtype)."""
    if (self.random_start or self.restarts > 1) and rng is None:
      raise ValueError("A random-start attack needs an rng (tf.random.Generator).")
    loss_fn = loss_fn or _cross_entropy
    best = self._one_run(model, loss_fn, x, labels, rng)
    for _ in range(self.restarts - 1):
      # Keep the first image that breaks each example; else try again.
      logits = model(best, training=False)
      broken = tf.not_equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
      candidate = self._one_run(model, loss_fn, x, labels, rng)
      mask = tf.reshape(broken, [-1] + [1] * (len(x.shape) - 1))
      best = tf.where(mask, best, candidate)
    return best

  def get_config(self) -> dict:
    return {"epsilon": self.epsilon, "step_size": self.step_size,
            "num_steps": self.num_steps, "norm": self.norm,
            "random_start": self.random_start, "restarts": self.restarts,
            "clip_min": self.clip_min, "clip_max": self.clip_max,
            "training": self.training}


def _cross_entropy(labels, logits):
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
