"""FGM on the token-embedding matrix (Miyato et al. 2017; Su Jianlin's Keras form).

One training step:
  1. clean pass: L(E) and g = ∂L/∂E, all-reduced over replicas, so the
     perturbation is that of the global batch;
  2. Δ = ε·g/(‖g‖ + tiny) (or ε·sign(g)); only rows of tokens in the batch
     are non-zero;
  3. adversarial pass on E + Δ; its gradients (alone, or added to the clean
     ones) are the update.

Δ is formed densely in E's shape by default (`combine="dense"`: one
scatter-add of the occurrence rows, the same cost as the hand-written FGM with
and without XLA); `combine="sorted"` keeps the older sort-based sparse form,
which is ~10× slower under XLA (`tfadv.methods.embedding_matrix`, docs/results.md).

E + Δ is never written into the variable: the adversarial pass runs inside a
`keras.StatelessScope` that substitutes the value E + Δ for E. Rows of tokens
absent from the batch get Δ = 0 exactly, so they read E unchanged. Nothing has to
be "removed" afterwards, so E after the step is exactly E before it plus the
optimizer's update (adding and subtracting Δ in float32 would not be), and no
replica writes to a mirrored variable inside the step.
"""

import gin
import keras
import tensorflow as tf

from tfadv.methods import embedding_matrix as embedding
from tfadv.methods import random_direction
from tfadv.loss_scaling import scaled_gradient
from tfadv.methods.base import FORMS, Method, MethodOutput, add_gradients, replica_mean
from tfadv.methods.embedding_matrix import TOKEN_EMBEDDING
from tfadv.models.state import random_state_variables
from tfadv.perturbation import ramped

NORMS = ("l2", "sign")


@gin.configurable
class EmbeddingFGM(Method):
  """Fast gradient method on the embedding matrix.

  Args:
    epsilon: size of the perturbation Δ (its L2 norm, or its per-entry
      magnitude for `norm="sign"`).
    norm: "l2" (Δ = ε·g/‖g‖) or "sign" (Δ = ε·sign(g)).
    form: "adversarial" updates from the adversarial loss only (Su's Keras
      code); "clean_plus_adversarial" adds the clean and adversarial
      gradients (most PyTorch FGM code).
    adversarial_weight: weight of the adversarial gradient in
      "clean_plus_adversarial".
    embedding_path: path (or path suffix) of the embedding variable;
      keras-hub's BERT calls it `token_embedding/embeddings`.
    combine: how duplicate gradient rows are summed: "dense" (a
      vocabulary × hidden scatter-add; fast with and without XLA) or
      "sorted" (sort + segment sum over the occurrences; slow under XLA).
    direction: "adversarial" (FGM) or "random", the equal-cost control: Δ
      has exactly the adversarial Δ's Frobenius norm (or, with "sign", its
      entries' magnitude and support) in a random direction on the rows of
      the batch's tokens (`tfadv.methods.random_direction`); the seed is
      `seed`.

  Example:
  >>> method = EmbeddingFGM(epsilon=0.5)
  >>> method.build(classifier)  # finds token_embedding/embeddings
  >>> out = method.compute_gradients(classifier, loss_fn, inputs, labels, weights)
  >>> sorted(out.metrics)
  ['adv_loss', 'delta_norm']
  """

  name = "fgm"

  def __init__(self, epsilon: float = 1.0, norm: str = "l2",
               form: str = "adversarial", adversarial_weight: float = 1.0,
               embedding_path: str = TOKEN_EMBEDDING, combine: str = "dense",
               direction: str = "adversarial", seed: int = 0):
    embedding.check_combine("EmbeddingFGM", combine)
    random_direction.check_direction("EmbeddingFGM", direction)
    if norm not in NORMS:
      raise ValueError(f"EmbeddingFGM.norm={norm!r}; expected one of {NORMS}.")
    if form not in FORMS:
      raise ValueError(f"EmbeddingFGM.form={form!r}; expected one of {FORMS}.")
    self.epsilon = epsilon
    self.norm = norm
    self.form = form
    self.adversarial_weight = adversarial_weight
    self.embedding_path = embedding_path
    self.combine = combine
    self.direction = direction
    self.seed = seed
    self._embedding = None
    self._step = None

  def build(self, model, input_shape=None):
    self._embedding = embedding.find_variable(model, self.embedding_path)
    self._random_state = random_state_variables(model)
    if self.direction == "random":
      self._step = random_direction.step_counter()

  @property
  def variables(self):
    return [self._step] if self._step is not None else []

  def perturbation(self, gradient):
    """Δ for the all-reduced matrix gradient `g` (dense, or rows of it)."""
    if self.norm == "sign":
      delta = ramped(self.epsilon) * tf.sign(gradient)
    else:
      norm = tf.sqrt(tf.reduce_sum(tf.square(gradient)))
      delta = ramped(self.epsilon) * gradient / (norm + 1e-12)
    if self.direction == "adversarial":
      return delta
    # The control: a random direction with Δ's norm on Δ's support (the rows
    # of the batch's tokens; with "sign", the entries where g is non-zero).
    noise = random_direction.normal(tf.shape(gradient),
                                    random_direction.next_seed(self.seed, self._step))
    if self.norm == "sign":
      return tf.abs(delta) * tf.sign(noise)
    rows = tf.cast(tf.reduce_any(tf.not_equal(gradient, 0.0), axis=-1, keepdims=True),
                   noise.dtype)
    noise *= rows
    return (tf.sqrt(tf.reduce_sum(tf.square(delta)))
            * noise / (tf.sqrt(tf.reduce_sum(tf.square(noise))) + 1e-12))

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    table = self._embedding
    variables = model.trainable_variables
    position = embedding.index_of(variables, table)
    with tf.GradientTape() as tape:
      logits = model(inputs, training=True)
      loss = loss_fn(labels, logits, weights)
    if self.form == "adversarial":
      # Only ∂L/∂E is needed: the backward pass stops at the embeddings.
      gradient = scaled_gradient(tape, loss, table)
      clean = None
    else:
      clean = scaled_gradient(tape, loss, variables)
      gradient = clean[position]
    context = tf.distribute.get_replica_context()
    value = tf.convert_to_tensor(table.value)
    if self.combine == "dense":
      gradient = embedding.dense_gradient(gradient, tf.shape(value)[0])
      gradient = context.all_reduce(tf.distribute.ReduceOp.SUM, gradient)
      delta = tf.stop_gradient(tf.cast(self.perturbation(gradient), table.dtype))
      perturbed = value + delta
    else:
      gradient = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    embedding.as_indexed_slices(gradient))
      indices, rows = embedding.combine_rows(gradient)
      delta = tf.stop_gradient(tf.cast(self.perturbation(rows), table.dtype))
      perturbed = tf.tensor_scatter_nd_add(value, indices[:, None], delta)
    others = [v for v in variables if v is not table]
    with tf.GradientTape() as tape:
      tape.watch(perturbed)
      with keras.StatelessScope(state_mapping=[(table, perturbed)]) as scope:
        adv_logits = model(inputs, training=True)
        adv_loss = loss_fn(labels, adv_logits, weights)
    adv_others = scaled_gradient(tape, adv_loss, others + [perturbed])
    # The adversarial pass drew dropout masks; keep the seed moving forward.
    for state in self._random_state:
      advanced = scope.get_current_value(state)
      if advanced is not None:
        state.assign(advanced)
    adv = list(adv_others[:-1])
    adv.insert(position, adv_others[-1])
    if clean is None:
      gradients = adv
    else:
      gradients = [add_gradients(c, a, self.adversarial_weight) for c, a in zip(clean, adv)]
    delta_norm = tf.sqrt(tf.reduce_sum(tf.square(delta)))
    return MethodOutput(loss=loss, logits=logits, gradients=gradients,
                        metrics={"adv_loss": replica_mean(adv_loss),
                                 "delta_norm": delta_norm})

  def get_config(self):
    return {"epsilon": self.epsilon, "norm": self.norm, "form": self.form,
            "adversarial_weight": self.adversarial_weight,
            "embedding_path": self.embedding_path, "combine": self.combine,
            "direction": self.direction, "seed": self.seed}

