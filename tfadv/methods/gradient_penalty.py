"""Gradient penalty on the token-embedding matrix (the seed's second form of FGM).

A first-order expansion of the FGM objective L(E + Δ) with Δ = ε·g gives
L + ε‖g‖², and with Δ = ε·g/‖g‖ gives L + ε‖g‖, where g = ∂L/∂E. Training on
L + ½ε‖g‖² ("squared", as in Su's Keras code) or L + ε‖g‖ ("norm") penalises
the loss's sensitivity to the embeddings directly. The penalty's gradient is
second order: g is computed under an inner `tf.GradientTape`, the total loss
differentiated under an outer one.

Distribution: the penalty is per replica. Each replica penalises the gradient
of its own mean loss, and the replicas' penalties are averaged; on one device
this is the global-batch penalty, but with N replicas it is the mean of N
smaller-batch penalties (‖mean of gradients‖² is not the mean of ‖gradient‖²),
so N replicas do not equal one device. All-reducing g inside the differentiated
function would make the second-order pass cross replicas; tfadv does not.
"""

import gin
import tensorflow as tf

from tfadv.methods import embedding
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.fgm import TOKEN_EMBEDDING

VARIANTS = ("squared", "norm")


@gin.configurable
class EmbeddingGradientPenalty(Method):
  """L + ½ε‖∂L/∂E‖² ("squared") or L + ε‖∂L/∂E‖ ("norm").

  Args:
    epsilon: penalty weight ε.
    variant: "squared" or "norm".
    embedding_path: path (or suffix) of the embedding variable.

  Example:
  >>> method = EmbeddingGradientPenalty(epsilon=1.0)
  >>> method.build(classifier)
  >>> out = method.compute_gradients(classifier, loss_fn, inputs, labels, weights)
  >>> sorted(out.metrics)
  ['grad_penalty', 'total_loss']
  """

  name = "gp"

  def __init__(self, epsilon: float = 1.0, variant: str = "squared",
               embedding_path: str = TOKEN_EMBEDDING):
    if variant not in VARIANTS:
      raise ValueError(f"EmbeddingGradientPenalty.variant={variant!r}; "
                       f"expected one of {VARIANTS}.")
    self.epsilon = epsilon
    self.variant = variant
    self.embedding_path = embedding_path
    self._embedding = None

  def build(self, model, input_shape=None):
    self._embedding = embedding.find_variable(model, self.embedding_path)

  def penalty(self, squared_norm):
    if self.variant == "squared":
      return 0.5 * self.epsilon * squared_norm
    return self.epsilon * tf.sqrt(squared_norm + 1e-24)

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    variables = model.trainable_variables
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        logits = model(inputs, training=True)
        loss = loss_fn(labels, logits, weights)
        # The replica's own mean loss (see the module docstring).
        local_loss = loss * replicas
      gradient = inner.gradient(local_loss, self._embedding)
      penalty = self.penalty(embedding.squared_norm(gradient))
      total = loss + penalty / replicas
    gradients = outer.gradient(total, variables)
    return MethodOutput(loss=loss, logits=logits, gradients=gradients,
                        metrics={"grad_penalty": penalty,
                                 "total_loss": total * replicas})

  def get_config(self):
    return {"epsilon": self.epsilon, "variant": self.variant,
            "embedding_path": self.embedding_path}
