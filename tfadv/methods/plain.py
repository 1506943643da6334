"""Plain (non-adversarial) training: the baseline every method is compared to."""

import gin

from tfadv.methods.base import Method, MethodOutput, clean_gradients


@gin.configurable
class Plain(Method):
  """Empirical risk minimisation: one forward and one backward pass.

  Example:
  >>> out = Plain().compute_gradients(model, loss_fn, inputs, labels, weights)
  >>> len(out.gradients) == len(model.trainable_variables)
  True
  """

  name = "plain"

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    loss, logits, grads = clean_gradients(model, loss_fn, inputs, labels, weights)
    return MethodOutput(loss=loss, logits=logits, gradients=grads)
