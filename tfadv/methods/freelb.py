"""FreeLB (Zhu et al. 2020): K ascent steps on the embedding outputs, their weight gradients averaged."""

from typing import Optional

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.loss_scaling import keep_if_finite
from tfadv.methods.base import MethodOutput, add_gradients, replica_mean
from tfadv.methods.embedding_output import BufferedEmbeddingOutputMethod
from tfadv.models.state import random_state_variables
from tfadv.perturbation import normalize, per_example_norm, project, ramped, stuck_share


@gin.configurable
class FreeLB(BufferedEmbeddingOutputMethod):
  """FreeLB-K (Zhu et al. 2020, Algorithm 1): K = `ascent_steps` ascent steps whose weight gradients are averaged.

  Per step, as in Algorithm 1 and the authors' code (zhuchen03/FreeLB):
  δ₀ = U(−a, a)/√N_δ entrywise on real tokens (zero at padding), where
  N_δ = (real tokens of the example) × hidden and a = `init_magnitude`
  (default ε, the paper's δ₀ = U(−ε, ε)/√N_δ); then K times: one
  forward/backward pass on e + δ of L/K gives both this pass's weight
  gradients (accumulated: their sum is the mean over the K passes) and
  g = ∂L/∂δ, and δ ← Π_{‖δ_i‖_F ≤ ε}(δ + α·g_i/‖g_i‖_F) per example.
  One optimizer update per step.

  `init_magnitude=0` starts from δ₀ = 0 (tfadv's earlier default, where one
  of the K gradients is the clean one).

  δ lives in a `tf.Variable` buffer of the per-replica batch's shape
  (batch × length × hidden, sync-on-read: one per replica), masked at
  padding positions. `carry_over=True` starts each batch from the previous
  batch's final δ (projected, masked) instead of a fresh draw (Shafahi et
  al.'s "free" carrying, for text); FreeLB proper (default) starts fresh.

  Dropout: `sync_dropout=True` (default) gives all K passes of a step the
  first pass's dropout masks, as both reference implementations do (the
  Hugging Face port feeds the first pass's `dp_masks` back; fairseq's
  `--no-sync-dp` defaults to False): the model's dropout seed states are
  set back to their value at the step's start before each later pass, so
  the next step still draws fresh masks. `False` draws fresh masks on every
  pass (tfadv's behaviour before 2026-11-30, which the validated text table
  of 2026-11-27 measured).

  Reported loss and accuracy are the first pass's, on e + δ₀ (clean only when
  `init_magnitude=0`).

  Example:
  >>> method = FreeLB(epsilon=1.0, step_size=0.3, ascent_steps=3)
  >>> method.build(classifier, input_shape=(32, 128))  # per-replica batch × length
  """

  buffer_name = "freelb_perturbation"
  name = "freelb"

  def __init__(self, epsilon: float = 1.0, step_size: float = 0.3, ascent_steps: int = 3,
               init_magnitude: Optional[float] = None, carry_over: bool = False,
               sync_dropout: bool = True, **kwargs):
    super().__init__(epsilon=epsilon, init_magnitude=init_magnitude, **kwargs)
    checks.check("FreeLB", step_size=(step_size, checks.NON_NEGATIVE),
                 ascent_steps=(ascent_steps, checks.AT_LEAST_ONE))
    self.step_size = float(step_size)
    self.ascent_steps = int(ascent_steps)
    self.carry_over = carry_over
    self.sync_dropout = sync_dropout

  def _start(self, mask):
    if self.carry_over:
      return project(tf.convert_to_tensor(self.perturbation) * mask, ramped(self.epsilon))
    return self.initial_delta(mask)

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    mask = self._mask(inputs)
    # The buffer's static shape (a reshape, which checks it at run time too):
    # `tf.ensure_shape` here made the XLA-compiled step 6x slower (FreeLB-3
    # 18.7x plain instead of 3.0x; docs/results/step-time.md).
    delta = tf.reshape(self._start(mask), self.perturbation.shape)

    def ascent_loss(labels, logits, weights):
      return loss_fn(labels, logits, weights) / self.ascent_steps

    # δ stays a tensor through the K passes; the buffer is written once, at
    # the end.
    total = None
    epsilon, step_size = ramped(self.epsilon), ramped(self.step_size)  # in force this step
    seeds = random_state_variables(model) if self.sync_dropout else []
    first_seeds = [tf.identity(state) for state in seeds]
    for ascent in range(self.ascent_steps):
      if ascent > 0:  # the first pass's dropout masks again
        for state, value in zip(seeds, first_seeds):
          state.assign(value)
      loss, logits, gradients, g = self._full_pass(
          model, ascent_loss, inputs, labels, weights, delta, mask)
      if ascent == 0:
        first_loss, first_logits = loss * self.ascent_steps, logits
      total = gradients if total is None else [add_gradients(t, a)
                                               for t, a in zip(total, gradients)]
      # The same backward pass moves δ: no extra pass for the ascent.
      delta = keep_if_finite(tf.stop_gradient(project(
          delta + step_size * normalize(g * mask), epsilon) * mask), delta)
    # A skipped step (any weight gradient not finite) leaves the buffer as it was.
    self.perturbation.assign(keep_if_finite(delta, self.perturbation, total))
    metrics = {"adv_loss": replica_mean(loss * self.ascent_steps),
               "delta_norm": tf.reduce_mean(per_example_norm(delta))}
    if self.carry_over:  # a persistent buffer: how much of it cannot move
      metrics["stuck"] = stuck_share(g, mask)
    return MethodOutput(loss=first_loss, logits=first_logits, gradients=total,
                        metrics=metrics)

  def get_config(self):
    return {**super().get_config(), "step_size": self.step_size,
            "ascent_steps": self.ascent_steps, "init_magnitude": self.init_magnitude,
            "carry_over": self.carry_over, "sync_dropout": self.sync_dropout}
