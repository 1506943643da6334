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
which is ~10× slower under XLA (`tfadv.methods.embedding_matrix`, docs/results/step-time.md).

E + Δ is never written into the variable: the adversarial pass runs inside a
`keras.StatelessScope` that substitutes the value E + Δ for E. Rows of tokens
absent from the batch get Δ = 0 exactly, so they read E unchanged. Nothing has to
be "removed" afterwards, so E after the step is exactly E before it plus the
optimizer's update (adding and subtracting Δ in float32 would not be), and no
replica writes to a mirrored variable inside the step.
"""

from typing import Optional

import gin
import keras
import tensorflow as tf

from tfadv import checks
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
    direction: "adversarial" (FGM) or "random", the equal-cost control:
      each row of Δ has exactly the adversarial Δ's norm in that row (so the
      rows of the batch's tokens, and the total norm, are the adversarial
      Δ's; with "sign", each entry's magnitude and support) in a random
      direction (`tfadv.methods.random_direction`); the seed is
      `seed` (None: the run's seed, `Method.seed_with`).

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
               direction: str = "adversarial", seed: Optional[int] = None):
    embedding.check_combine("EmbeddingFGM", combine)
    random_direction.check_direction("EmbeddingFGM", direction)
    checks.check("EmbeddingFGM", epsilon=(epsilon, checks.NON_NEGATIVE),
                 norm=(norm, checks.one_of(NORMS)), form=(form, checks.one_of(FORMS)),
                 adversarial_weight=(adversarial_weight, checks.NON_NEGATIVE))
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
    # The control: each row of Δ keeps its norm and gets a random direction
    # (with "sign", each entry keeps its magnitude and gets a random sign).
    # Keeping only the total norm would not do: the adversarial Δ piles onto
    # rows used many times in a batch ([CLS], [SEP], common characters), so
    # each example would receive more of it than of the control.
    noise = random_direction.normal(tf.shape(gradient),
                                    random_direction.next_seed(self.draw_seed, self._step))
    if self.norm == "sign":
      return tf.abs(delta) * tf.sign(noise)
    row_norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=-1, keepdims=True))
    noise_norm = tf.sqrt(tf.reduce_sum(tf.square(noise), axis=-1, keepdims=True))
    return row_norm * noise / (noise_norm + 1e-12)

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
            "direction": self.direction, "seed": self.draw_seed}

