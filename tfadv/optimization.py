"""AdamW with linear warmup and linear decay, as BERT fine-tuning uses."""

import gin
import keras

from tfadv import checks
from keras import ops


@keras.saving.register_keras_serializable(package="tfadv")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to `peak_learning_rate`, then linear decay to `end`.

  Example:
  >>> schedule = WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=100)
  >>> float(schedule(5)), float(schedule(10)), float(schedule(100))
  (0.0005, 0.001, 0.0)
  """

  def __init__(self, peak_learning_rate: float, warmup_steps: int,
               total_steps: int, end_learning_rate: float = 0.0):
    self.peak_learning_rate = peak_learning_rate
    self.warmup_steps = warmup_steps
    self.total_steps = total_steps
    self.end_learning_rate = end_learning_rate

  def __call__(self, step):
    step = ops.cast(step, "float32")
    warmup = ops.cast(max(self.warmup_steps, 1), "float32")
    decay_steps = ops.cast(max(self.total_steps - self.warmup_steps, 1), "float32")
    warm = self.peak_learning_rate * step / warmup
    progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
    decayed = self.peak_learning_rate + (
        self.end_learning_rate - self.peak_learning_rate) * progress
    return ops.where(step < self.warmup_steps, warm, decayed)

  def get_config(self):
    return {"peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
            "end_learning_rate": self.end_learning_rate}


@gin.configurable(denylist=["total_steps"])
def adamw(total_steps: int, learning_rate: float = 5e-5,
          warmup_fraction: float = 0.1, weight_decay: float = 0.01,
          beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-6,
          clipnorm=None) -> keras.optimizers.Optimizer:
  """AdamW; LayerNorm parameters and biases are excluded from weight decay."""
  checks.check("adamw", total_steps=(total_steps, checks.AT_LEAST_ONE),
               learning_rate=(learning_rate, checks.POSITIVE),
               warmup_fraction=(warmup_fraction, checks.FRACTION),
               weight_decay=(weight_decay, checks.NON_NEGATIVE),
               beta_1=(beta_1, checks.OPEN_FRACTION), beta_2=(beta_2, checks.OPEN_FRACTION),
               epsilon=(epsilon, checks.POSITIVE), clipnorm=(clipnorm, checks.POSITIVE))
  schedule = WarmupLinearDecay(learning_rate, int(warmup_fraction * total_steps),
                               total_steps)
  optimizer = keras.optimizers.AdamW(
      learning_rate=schedule, weight_decay=weight_decay, beta_1=beta_1,
      beta_2=beta_2, epsilon=epsilon, global_clipnorm=clipnorm)
  optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
  return optimizer


NO_DECAY = ("bias", "gamma", "beta")
WEIGHT_DECAY_MODES = ("decoupled", "l2")


@keras.saving.register_keras_serializable(package="tfadv")
class SGDWithL2(keras.optimizers.SGD):
  """SGD whose gradients carry a coupled L2 term: g ← g + l2·w.

  That is SGD on loss + (l2/2)·Σ‖w‖² = loss + l2·Σ `tf.nn.l2_loss(w)`, the
  weight decay of Madry's and Shafahi et al.'s CIFAR-10 code (there
  `weight_decay * sum(tf.nn.l2_loss(w) for kernels)`, 2e-4). Unlike Keras's
  decoupled `weight_decay`, the term passes through momentum, so with
  momentum 0.9 it acts about 10× stronger at the same number. Variables
  whose name contains one of `exclude` (biases, BatchNorm γ/β) get no term.
  The term is added in `update_step`, after gradients are all-reduced, so it
  is counted once under any strategy, in tfadv's trainer and in Keras's `fit`.

  Example:
  >>> opt = SGDWithL2(learning_rate=0.1, momentum=0.9, l2=2e-4)
  """

  def __init__(self, l2: float = 0.0, exclude=NO_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.l2 = float(l2)
    self.exclude = tuple(exclude)

  def _decays(self, variable) -> bool:
    return not any(word in variable.name for word in self.exclude)

  def update_step(self, gradient, variable, learning_rate):
    # Per variable, after any cross-replica reduction of the gradients (in
    # Keras's own `fit` under MirroredStrategy the optimizer all-reduces
    # them before this), so N replicas add the term once, not N times.
    if self._decays(variable):
      gradient = (keras.ops.convert_to_tensor(gradient)
                  + keras.ops.cast(self.l2, gradient.dtype) * variable)
    return super().update_step(gradient, variable, learning_rate)

  def get_config(self):
    return {**super().get_config(), "l2": self.l2, "exclude": list(self.exclude)}


@gin.configurable(denylist=["total_steps"])
def sgd_momentum(total_steps: int, learning_rate: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 2e-4,
                 boundaries=(0.5, 0.75), decay: float = 0.1,
                 nesterov: bool = False,
                 weight_decay_mode: str = "decoupled") -> keras.optimizers.Optimizer:
  """SGD with momentum and step decay at fractions of the run (Madry/Shafahi CIFAR-10).

  `weight_decay_mode`: "decoupled" (Keras's `weight_decay`: w ← w − lr·wd·w
  beside the momentum update) or "l2" (the coupled L2 term of Madry's and
  Shafahi's code, `SGDWithL2`: g ← g + wd·w before momentum). Either way
  biases and BatchNorm parameters are excluded.

  Example:
  >>> opt = sgd_momentum(total_steps=1000)  # lr 0.1, 0.01 from step 500, ...
  >>> opt = sgd_momentum(total_steps=1000, weight_decay_mode="l2")  # Madry's decay
  """
  checks.check("sgd_momentum", total_steps=(total_steps, checks.AT_LEAST_ONE),
               learning_rate=(learning_rate, checks.POSITIVE),
               momentum=(momentum, checks.OPEN_FRACTION),
               weight_decay=(weight_decay, checks.NON_NEGATIVE),
               decay=(decay, checks.NON_NEGATIVE),
               boundaries=(tuple(boundaries), checks.FRACTIONS),
               weight_decay_mode=(weight_decay_mode, checks.one_of(WEIGHT_DECAY_MODES)))
  steps = [int(f * total_steps) for f in boundaries]
  values = [learning_rate * decay ** i for i in range(len(steps) + 1)]
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(steps, values)
  if weight_decay_mode == "l2":
    return SGDWithL2(learning_rate=schedule, momentum=momentum, nesterov=nesterov,
                     l2=weight_decay)
  optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=momentum,
                                   nesterov=nesterov, weight_decay=weight_decay)
  optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return optimizer
