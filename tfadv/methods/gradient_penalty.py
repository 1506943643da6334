"""Gradient penalty on the token embeddings (the seed's second form of FGM).

A first-order expansion of the FGM objective L(E + Δ) with Δ = ε·g gives
L + ε‖g‖², and with Δ = ε·g/‖g‖ gives L + ε‖g‖. Training on L + ½ε‖g‖²
("squared", as in Su's Keras code) or L + ε‖g‖ ("norm") penalises the loss's
sensitivity to the embeddings directly. The penalty's gradient is second
order: g is computed under an inner `tf.GradientTape`, the total loss
differentiated under an outer one.

Which g, chosen by `form`:

- `"per_occurrence"` (the default; Su Jianlin's bert4keras code,
  `K.sum(K.gradients(loss, [embeddings])[0].values ** 2)`): the gradient rows
  *as the embedding lookup produces them*, one per token occurrence, not
  combined. Equivalently, the squared gradient norm at the lookup's output
  (batch × length × hidden). A token that occurs twice contributes two
  squared rows, not the square of their sum. With the loss a batch mean, the
  penalty is ½ε Σ_i ‖∂ℓ_i/∂e_i‖² / B²: a sum over examples, so each replica
  penalises its own examples' rows of its share of the global loss and N
  replicas equal one device exactly.
- `"matrix"`: g = ∂L/∂E, the gradient of the embedding *matrix* (duplicate
  rows summed first, `combine` chooses how; see `tfadv.methods.embedding`).
  This does not decompose over examples: each replica penalises the gradient
  of its own mean loss, and the replicas' penalties are averaged; on one
  device this is the global-batch penalty, but with N replicas it is the mean
  of N smaller-batch penalties (‖mean of gradients‖² is not the mean of
  ‖gradient‖²), so N replicas do not equal one device. All-reducing g inside
  the differentiated function would make the second-order pass cross
  replicas; tfadv does not.
"""

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.methods import embedding_matrix as embedding
from tfadv.loss_scaling import loss_scale, scaled_gradient
from tfadv.methods.base import Method, MethodOutput, replica_mean
from tfadv.methods.embedding_matrix import TOKEN_EMBEDDING
from tfadv.perturbation import ramped

VARIANTS = ("squared", "norm")
FORMS = ("per_occurrence", "matrix")


@gin.configurable
class EmbeddingGradientPenalty(Method):
  """L + ½ε‖g‖² ("squared") or L + ε‖g‖ ("norm"), g the embedding gradient.

  Args:
    epsilon: penalty weight ε.
    variant: "squared" or "norm".
    form: "per_occurrence" (Su's: the lookup's gradient rows, uncombined) or
      "matrix" (the combined gradient of the embedding matrix).
    embedding_path: path (or suffix) of the embedding variable.
    combine: for form="matrix", how duplicate rows are summed ("dense" or
      "sorted", as in `EmbeddingFGM`).

  Example:
  >>> method = EmbeddingGradientPenalty(epsilon=1.0)
  >>> method.build(classifier)
  >>> out = method.compute_gradients(classifier, loss_fn, inputs, labels, weights)
  >>> sorted(out.metrics)
  ['grad_penalty', 'total_loss']
  """

  name = "gp"

  def __init__(self, epsilon: float = 1.0, variant: str = "squared",
               form: str = "per_occurrence",
               embedding_path: str = TOKEN_EMBEDDING, combine: str = "dense"):
    checks.check("EmbeddingGradientPenalty", epsilon=(epsilon, checks.NON_NEGATIVE),
                 variant=(variant, checks.one_of(VARIANTS)), form=(form, checks.one_of(FORMS)))
    embedding.check_combine("EmbeddingGradientPenalty", combine)
    self.epsilon = epsilon
    self.variant = variant
    self.form = form
    self.embedding_path = embedding_path
    self.combine = combine
    self._embedding = None

  def build(self, model, input_shape=None):
    self._embedding = embedding.find_variable(model, self.embedding_path)

  def penalty(self, squared_norm):
    if self.variant == "squared":
      return 0.5 * ramped(self.epsilon) * squared_norm
    return ramped(self.epsilon) * tf.sqrt(squared_norm + 1e-24)

  def _squared_norm(self, tape, loss):
    """‖g‖² of the unscaled gradient (float16: g is taken scaled, then the
    square divided by the scale's square)."""
    table = self._embedding
    gradient = scaled_gradient(tape, loss, table)
    if self.form == "matrix":
      squared = embedding.squared_norm(gradient, tf.shape(table.value)[0], self.combine)
    elif isinstance(gradient, tf.IndexedSlices):
      squared = tf.reduce_sum(tf.square(gradient.values))
    else:
      raise ValueError(
          f"EmbeddingGradientPenalty(form='per_occurrence') needs the lookup's "
          f"per-occurrence gradient rows, but {table.path} has a dense gradient "
          "(is the matrix also used outside the lookup?). Use form='matrix'.")
    return squared / tf.cast(tf.square(loss_scale()), squared.dtype)

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    variables = model.trainable_variables
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        logits = model(inputs, training=True)
        loss = loss_fn(labels, logits, weights)
        # per_occurrence: this replica's share of the global loss (the
        # penalty is a sum over examples); matrix: the replica's own mean.
        scale = 1 if self.form == "per_occurrence" else replicas
        local_loss = loss * scale
      penalty = self.penalty(self._squared_norm(inner, local_loss))
      total = loss + penalty / scale
    gradients = scaled_gradient(outer, total, variables)
    return MethodOutput(loss=loss, logits=logits, gradients=gradients,
                        metrics={"grad_penalty": replica_mean(penalty / scale),
                                 "total_loss": replica_mean(total)})

  def get_config(self):
    return {"epsilon": self.epsilon, "variant": self.variant, "form": self.form,
            "embedding_path": self.embedding_path, "combine": self.combine}
