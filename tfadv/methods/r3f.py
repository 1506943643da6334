"""R3F (Aghajanyan et al., ICLR 2021): noise on the embedding outputs and a symmetric-KL term, no ascent pass."""

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.loss_scaling import scaled_gradient
from tfadv.methods import random_direction
from tfadv.methods.base import MethodOutput, replica_mean
from tfadv.methods.embedding_output import EmbeddingOutputMethod
from tfadv.perturbation import per_example_norm, ramped

NOISE_TYPES = ("uniform", "normal")


def symmetric_kl(logits_p: tf.Tensor, logits_q: tf.Tensor) -> tf.Tensor:
  """KL(p‖q) + KL(q‖p) per example, from logits (computed in float32)."""
  log_p = tf.nn.log_softmax(tf.cast(logits_p, tf.float32), axis=-1)
  log_q = tf.nn.log_softmax(tf.cast(logits_q, tf.float32), axis=-1)
  return tf.reduce_sum((tf.exp(log_p) - tf.exp(log_q)) * (log_p - log_q), axis=-1)


@gin.configurable
class R3F(EmbeddingOutputMethod):
  """R3F: loss = CE(clean) + λ·symKL(clean, noisy), noise on the token embeddings.

  As fairseq's `examples/rxf` (`sentence_prediction_r3f.py`) does it, per
  step: a clean pass on the token embeddings e; a noisy pass on
  stop_gradient(e) + z, z ~ U(−σ, σ) (`noise_type="uniform"`, fairseq's
  default) or N(0, σ²) (`"normal"`) entrywise, σ = `epsilon` (fairseq's
  `--eps`, default 1e-5); loss = mean CE(clean) + λ · mean over examples of
  KL(p_clean‖p_noisy) + KL(p_noisy‖p_clean), λ = `r3f_lambda` (fairseq's
  `--r3f-lambda`, default 1.0). One backward pass through both branches:
  the weights receive the gradient of both, the token-embedding table only
  through the clean branch (fairseq detaches the noisy branch's embeddings).
  No ascent pass: two forwards and one backward through both, about 2× a
  plain step. Each pass draws its own dropout masks, as fairseq's two
  forward calls in training mode do; at σ = 1e-5 most of the KL term is the
  two passes' dropout disagreement.

  Differences from fairseq, neither changing the loss: z is zero at padding
  positions (fairseq adds it there too; padding is masked out of attention
  and the classifier reads [CLS], so those entries do not reach the logits),
  and z is a stateless draw from (`seed`, a checkpointed step count) over the
  global batch, sliced by replica, so resume is exact and N replicas draw
  one device's noise. Reported loss and accuracy are the clean pass's;
  `sym_kl` is the KL term's batch mean.

  Example:
  >>> method = R3F(epsilon=1e-5, r3f_lambda=1.0)
  >>> method.build(classifier)  # hooks keras-hub's token_embedding
  >>> out = method.compute_gradients(classifier, loss_fn, inputs, labels, weights)
  >>> sorted(out.metrics)
  ['noise_norm', 'sym_kl']
  """

  name = "r3f"

  def __init__(self, epsilon: float = 1e-5, r3f_lambda: float = 1.0,
               noise_type: str = "uniform", **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    checks.check("R3F", r3f_lambda=(r3f_lambda, checks.NON_NEGATIVE),
                 noise_type=(noise_type, checks.one_of(NOISE_TYPES)))
    self.r3f_lambda = float(r3f_lambda)
    self.noise_type = noise_type
    self._step = None

  def build(self, model, input_shape=None):
    super().build(model, input_shape)
    self._step = random_direction.step_counter()

  @property
  def variables(self):
    return super().variables + ([self._step] if self._step is not None else [])

  def noise(self, mask) -> tf.Tensor:
    """This step's z (batch × length × hidden), zero at padding."""
    draw = (random_direction.per_example_uniform if self.noise_type == "uniform"
            else random_direction.per_example_normal)
    shape = tf.shape(self._zeros(mask))
    return ramped(self.epsilon) * draw(shape, random_direction.next_seed(self.draw_seed, self._step)) * mask

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    mask = self._mask(inputs)
    noise = self.noise(mask)
    context = tf.distribute.get_replica_context()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
      logits = model(inputs, training=True)
      loss = loss_fn(labels, logits, weights)
      with self.hook.adding(noise, detach=True):
        noisy_logits = model(inputs, training=True)
      # This replica's share of the global-batch mean, as `loss_fn`'s.
      global_batch = tf.cast(tf.shape(weights)[0] * context.num_replicas_in_sync,
                             tf.float32)
      kl = tf.reduce_sum(symmetric_kl(logits, noisy_logits) * weights) / global_batch
      total = loss + self.r3f_lambda * kl
    gradients = scaled_gradient(tape, total, variables)
    return MethodOutput(loss=loss, logits=logits, gradients=gradients, metrics={
        "sym_kl": replica_mean(kl),
        "noise_norm": tf.reduce_mean(per_example_norm(noise))})

  def get_config(self):
    return {**super().get_config(), "r3f_lambda": self.r3f_lambda,
            "noise_type": self.noise_type}
