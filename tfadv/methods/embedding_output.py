"""Per-example perturbations of the embedding layer's output: the shared base, FGM and PGD-K.

Unlike `EmbeddingFGM` (one Δ on the shared embedding *matrix*), these methods
perturb each example's token embeddings e ∈ R^{length × hidden}
independently (Miyato et al. 2017's per-example form), through
`tfadv.models.hooks.EmbeddingOutputHook`. FreeLB (`tfadv.methods.freelb`) and
Free on text (`tfadv.methods.free.EmbeddingOutputFree`) build on the same base:

- the ball is per example: ‖δ_i‖₂ ≤ ε, the norm over length × hidden;
- ascent directions are per-example normalised gradients g_i/‖g_i‖₂;
- padding positions (`padding_mask` = 0) never receive a perturbation.

Because every direction is normalised per example, the 1/global_batch
factor of the loss cancels, and N replicas produce exactly the δ of one
device with the same global batch (random starts aside: each replica draws
its own).

Cost per step, in plain steps (forward 1, backward to the inputs 1, full
backward 2): FGM 2 (both forms: clean pass, then adversarial pass); PGD-K
(2K + 3)/3 in the adversarial form (K ascent passes needing only δ's
gradient, one full pass); FreeLB-m about m (m full passes whose weight
gradients are averaged, δ ascending from the same backward passes).
"""

from typing import Optional

import gin
import tensorflow as tf

from tfadv import checks, perturbation
from tfadv.loss_scaling import scaled_gradient
from tfadv.methods import random_direction
from tfadv.methods.base import (FORMS, Method, MethodOutput, add_gradients,
                                replica_mean)
from tfadv.models.hooks import EmbeddingOutputHook
from tfadv.perturbation import normalize, per_example_norm, project, ramped


class EmbeddingOutputMethod(Method):
  """Shared pieces: the hook, the padding mask, seeded random starts.

  Args:
    epsilon: radius of each example's ℓ2 ball.
    layer_name: the embedding layer whose output is perturbed (keras-hub
      BERT: `token_embedding`); a wrong name lists candidates.
    padding_mask_key: the input holding the padding mask (1 = token); None
      perturbs every position.
    seed: seed of random starts and noise (None: the run's seed,
      `Method.seed_with`; each replica draws its own stream).
  """

  def __init__(self, epsilon: float = 1.0, layer_name: str = "token_embedding",
               padding_mask_key: Optional[str] = "padding_mask",
               seed: Optional[int] = None):
    checks.check(type(self).__name__, epsilon=(epsilon, checks.NON_NEGATIVE))
    self.epsilon = float(epsilon)
    self.layer_name = layer_name
    self.padding_mask_key = padding_mask_key
    self.seed = seed
    self.hook = None
    self._rng = None

  def build(self, model, input_shape=None):
    del input_shape
    self.hook = EmbeddingOutputHook(model, self.layer_name)
    self._rng = tf.random.Generator.from_seed(self.draw_seed)

  @property
  def variables(self):
    return [self._rng] if self._rng is not None else []

  def _mask(self, inputs) -> tf.Tensor:
    """[batch, length, 1] float mask of real tokens."""
    return perturbation.token_mask(inputs, self.padding_mask_key, type(self).__name__)

  def _zeros(self, mask) -> tf.Tensor:
    return tf.zeros(tf.concat([tf.shape(mask)[:2], [self.hook.output_dim]], 0))

  def _random_start(self, mask) -> tf.Tensor:
    """A uniform draw from each example's ε-ball (restricted to real tokens)."""
    return perturbation.random_start(tf.shape(self._zeros(mask)), ramped(self.epsilon), "l2",
                                     self._rng, mask=mask)

  def _forward(self, model, inputs, delta, mask):
    with self.hook.adding(delta * mask):
      return model(inputs, training=True)

  def _delta_gradient(self, model, loss_fn, inputs, labels, weights, delta, mask):
    """(loss, logits, ∂loss/∂δ): a pass whose backward stops at δ."""
    with tf.GradientTape() as tape:
      tape.watch(delta)
      logits = self._forward(model, inputs, delta, mask)
      loss = loss_fn(labels, logits, weights)
    return loss, logits, scaled_gradient(tape, loss, delta)

  def _full_pass(self, model, loss_fn, inputs, labels, weights, delta, mask):
    """(loss, logits, weight gradients, ∂loss/∂δ): one forward, one backward."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
      tape.watch(delta)
      logits = self._forward(model, inputs, delta, mask)
      loss = loss_fn(labels, logits, weights)
    *gradients, delta_gradient = scaled_gradient(tape, loss, variables + [delta])
    return loss, logits, gradients, delta_gradient

  def get_config(self):
    return {"epsilon": self.epsilon, "layer_name": self.layer_name,
            "padding_mask_key": self.padding_mask_key, "seed": self.draw_seed}


@gin.configurable
class EmbeddingOutputFGM(EmbeddingOutputMethod):
  """FGM on each example's embedding output: δ_i = ε·g_i/‖g_i‖₂.

  g = ∂L/∂e at the clean embeddings e. `form="clean_plus_adversarial"`
  (default, the usual PyTorch FGM) sums the clean and adversarial
  gradients; `"adversarial"` keeps the adversarial gradient only.
  `direction="random"` is the equal-cost control: δ_i has exactly the
  adversarial δ_i's norm and a random direction on the real tokens
  (`tfadv.methods.random_direction`).

  Example:
  >>> method = EmbeddingOutputFGM(epsilon=1.0)
  >>> method.build(classifier)  # hooks keras-hub's token_embedding
  >>> out = method.compute_gradients(classifier, loss_fn, inputs, labels, weights)
  >>> sorted(out.metrics)
  ['adv_loss', 'delta_norm']
  """

  name = "fgm_output"

  def __init__(self, epsilon: float = 1.0, form: str = "clean_plus_adversarial",
               adversarial_weight: float = 1.0, direction: str = "adversarial",
               **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    checks.check("EmbeddingOutputFGM", form=(form, checks.one_of(FORMS)),
                 adversarial_weight=(adversarial_weight, checks.NON_NEGATIVE))
    random_direction.check_direction("EmbeddingOutputFGM", direction)
    self.form = form
    self.adversarial_weight = adversarial_weight
    self.direction = direction
    self._step = None

  def build(self, model, input_shape=None):
    super().build(model, input_shape)
    if self.direction == "random":
      self._step = random_direction.step_counter()

  @property
  def variables(self):
    return super().variables + ([self._step] if self._step is not None else [])

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    mask = self._mask(inputs)
    zero = self._zeros(mask)
    if self.form == "adversarial":
      loss, logits, g = self._delta_gradient(model, loss_fn, inputs, labels,
                                             weights, zero, mask)
      clean = None
    else:
      loss, logits, clean, g = self._full_pass(model, loss_fn, inputs, labels,
                                               weights, zero, mask)
    delta = tf.stop_gradient(ramped(self.epsilon) * normalize(g * mask))
    if self.direction == "random":  # the control: same norm per example, random direction
      noise = random_direction.per_example_normal(
          tf.shape(delta), random_direction.next_seed(self.draw_seed, self._step))
      delta = per_example_norm(delta) * normalize(noise * mask)
    adv_loss, _, adv, _ = self._full_pass(model, loss_fn, inputs, labels, weights,
                                          delta, mask)
    gradients = adv if clean is None else [
        add_gradients(c, a, self.adversarial_weight) for c, a in zip(clean, adv)]
    return MethodOutput(loss=loss, logits=logits, gradients=gradients, metrics={
        "adv_loss": replica_mean(adv_loss),
        "delta_norm": tf.reduce_mean(per_example_norm(delta))})

  def get_config(self):
    return {**super().get_config(), "form": self.form,
            "adversarial_weight": self.adversarial_weight, "direction": self.direction}


@gin.configurable
class EmbeddingOutputPGD(EmbeddingOutputMethod):
  """PGD-K on each example's embedding output (ℓ2 ball of radius ε).

  δ⁰ is a random point of the ball (or 0); K times δ ← Π_ε(δ + α·g/‖g‖₂),
  each from a pass whose backward stops at δ; then one full pass on δᴷ.
  `form="adversarial"` (default, Madry et al.) updates from that pass
  alone and reports its loss and accuracy; `"clean_plus_adversarial"` adds
  a clean pass's gradients (one plain step more) and reports the clean ones.

  Example:
  >>> method = EmbeddingOutputPGD(epsilon=1.0, step_size=0.4, num_steps=3)
  """

  name = "pgd_output"

  def __init__(self, epsilon: float = 1.0, step_size: Optional[float] = None,
               num_steps: int = 3, random_start: bool = True,
               form: str = "adversarial", adversarial_weight: float = 1.0, **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    checks.check("EmbeddingOutputPGD", step_size=(step_size, checks.NON_NEGATIVE),
                 num_steps=(num_steps, checks.AT_LEAST_ONE), form=(form, checks.one_of(FORMS)),
                 adversarial_weight=(adversarial_weight, checks.NON_NEGATIVE))
    self.step_size = float(step_size if step_size is not None
                           else 2.5 * epsilon / num_steps)
    self.num_steps = num_steps
    self.random_start = random_start
    self.form = form
    self.adversarial_weight = adversarial_weight

  def attack(self, model, loss_fn, inputs, labels, weights, mask):
    """δᴷ for this batch (masked, inside each example's ball)."""
    delta = self._random_start(mask) if self.random_start else self._zeros(mask)
    epsilon, step_size = ramped(self.epsilon), ramped(self.step_size)  # in force this step
    for _ in range(self.num_steps):
      _, _, g = self._delta_gradient(model, loss_fn, inputs, labels, weights,
                                     delta, mask)
      delta = project(delta + step_size * normalize(g * mask), epsilon) * mask
    return tf.stop_gradient(delta)

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    mask = self._mask(inputs)
    delta = self.attack(model, loss_fn, inputs, labels, weights, mask)
    adv_loss, adv_logits, adv, _ = self._full_pass(model, loss_fn, inputs, labels,
                                                   weights, delta, mask)
    metrics = {"adv_loss": replica_mean(adv_loss),
               "delta_norm": tf.reduce_mean(per_example_norm(delta))}
    if self.form == "adversarial":
      return MethodOutput(loss=adv_loss, logits=adv_logits, gradients=adv,
                          metrics=metrics)
    loss, logits, clean, _ = self._full_pass(model, loss_fn, inputs, labels, weights,
                                             self._zeros(mask), mask)
    gradients = [add_gradients(c, a, self.adversarial_weight) for c, a in zip(clean, adv)]
    return MethodOutput(loss=loss, logits=logits, gradients=gradients, metrics=metrics)

  def get_config(self):
    return {**super().get_config(), "step_size": self.step_size,
            "num_steps": self.num_steps, "random_start": self.random_start,
            "form": self.form, "adversarial_weight": self.adversarial_weight}


class BufferedEmbeddingOutputMethod(EmbeddingOutputMethod):
  """An embedding-output method whose δ persists in a per-replica buffer.

  `build` creates `perturbation`: a `tf.Variable` of the per-replica batch's
  shape (batch × length × hidden), sync-on-read (each replica keeps its own
  examples' δ), checkpointed with the model (`variables`).

  `initial_delta` is FreeLB's random start (Algorithm 1): δ₀ = U(−a, a)/√N_δ
  entrywise on each example's real tokens (zero at padding), N_δ = real
  tokens × hidden, a = `init_magnitude` (default ε; 0 starts from δ₀ = 0).
  """

  buffer_name = "perturbation"

  def __init__(self, epsilon: float = 1.0, init_magnitude: Optional[float] = None,
               **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    checks.check(type(self).__name__, init_magnitude=(init_magnitude, checks.NON_NEGATIVE))
    self.init_magnitude = float(self.epsilon if init_magnitude is None else init_magnitude)
    self.perturbation = None

  def initial_delta(self, mask):
    """δ₀: U(−a, a)/√N_δ on each example's real tokens, 0 at padding."""
    if self.init_magnitude == 0:
      return self._zeros(mask)
    dims = tf.reduce_sum(mask, axis=[1, 2], keepdims=True) * self.hook.output_dim
    uniform = self._rng.uniform(tf.shape(self._zeros(mask)), -1.0, 1.0)
    return ramped(self.init_magnitude) * uniform * mask / tf.sqrt(tf.maximum(dims, 1.0))

  def build(self, model, input_shape=None):
    super().build(model)
    if input_shape is None or len(input_shape) < 2:
      raise ValueError(f"{type(self).__name__} needs the per-replica input shape "
                       "(batch, length): its perturbation buffer is batch × length × hidden.")
    self.perturbation = tf.Variable(
        tf.zeros(tuple(input_shape[:2]) + (self.hook.output_dim,), tf.float32),
        trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name=self.buffer_name)

  @property
  def variables(self):
    return super().variables + ([self.perturbation] if self.perturbation is not None
                                else [])
