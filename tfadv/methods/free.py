"""Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!"), on images and on text.

`FreeTraining` perturbs the input images (the paper's setting, ℓ∞);
`EmbeddingOutputFree` perturbs each example's token embeddings (ℓ2 per
example, padding masked), the same algorithm on text.

Each minibatch is replayed m times in a row (the input pipeline does that,
from `batch_replays`). Every replay is one forward/backward pass on
clip(x + δ, 0, 1) whose gradients serve twice: the weight gradients are the
update, and the gradient with respect to δ moves the perturbation,
δ ← clip(δ + ε·sign(∇_δ L), -ε, ε). As in Shafahi et al.'s code
(ashafahi/free_adv_train: `tf.gradients` of the loss with respect to the
perturbation variable, through `tf.clip_by_value`), ∇_δ passes through the
pixel clamp: where x + δ lies outside [0, 1] its gradient is zero, sign(0) = 0,
and that entry of δ stays where it is (Fashion-MNIST's black background).
`through_clamp=False` takes the gradient at the clamped image instead
(tfadv's earlier behaviour, which moves those entries too); on Fashion-MNIST
it gave markedly more robust models (docs/results.md). δ lives in a `tf.Variable` and is carried
over to the next minibatch, so the attack keeps improving across batches.
A replay costs one plain step; the run takes as many weight updates as
natural training and hence sees 1/m of its epochs ("epochs divided by m":
`Experiment.train_epochs` does the division).

Under a distribution strategy the buffer is a sync-on-read variable: every
replica holds its own δ for its own slice of the batch. A checkpoint stores
replica 0's δ and restores it to every replica (exact on one device).

Training batches are always full: the input pipeline is step-indexed and
wraps around epoch boundaries, so there is no last partial batch and the
buffer's shape (the per-replica batch) never changes.
"""

import gin
import tensorflow as tf

from tfadv.loss_scaling import keep_if_finite, scaled_gradient
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.embedding_output import BufferedEmbeddingOutputMethod
from tfadv.perturbation import normalize, per_example_norm, project


@gin.configurable
class FreeTraining(Method):
  """Free-m adversarial training with a persistent perturbation buffer.

  Args:
    epsilon: ℓ∞ radius; also the ascent step of δ, as in the paper.
    replays: m, the times each minibatch is replayed.
    clip_min, clip_max: pixel range of x + δ.
    through_clamp: δ's gradient passes through the clamp (the reference
      code; default), or is taken at the clamped image (False).

  Special case: with m = 1 and a zero buffer, the first step's update is
  plain training's, and the buffer after it is the FGSM perturbation
  ε·sign(∇ₓL(x)).

  Example:
  >>> method = FreeTraining(epsilon=0.1, replays=8)
  >>> method.build(model, input_shape=(64, 28, 28, 1))  # per-replica batch
  >>> out = method.compute_gradients(model, loss_fn, images, labels, weights)
  """

  name = "free"

  def __init__(self, epsilon: float = 0.1, replays: int = 8,
               clip_min: float = 0.0, clip_max: float = 1.0,
               through_clamp: bool = True):
    if replays < 1:
      raise ValueError(f"FreeTraining.replays={replays}; expected >= 1.")
    self.epsilon = float(epsilon)
    self.batch_replays = int(replays)
    self.clip_min = clip_min
    self.clip_max = clip_max
    self.through_clamp = through_clamp
    self.perturbation = None

  def build(self, model, input_shape=None):
    del model
    if input_shape is None:
      raise ValueError("FreeTraining needs the per-replica input shape: its "
                       "perturbation buffer has the shape of one replica's batch.")
    self.perturbation = tf.Variable(
        tf.zeros(input_shape, tf.float32), trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        name="free_perturbation")

  @property
  def variables(self):
    return [self.perturbation] if self.perturbation is not None else []

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    images = tf.convert_to_tensor(inputs)
    delta = tf.convert_to_tensor(self.perturbation)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
      tape.watch(delta)
      # The clamp is inside the tape: ∇_δ is zero where x + δ is clamped.
      x_adv = tf.clip_by_value(images + tf.cast(delta, images.dtype),
                               self.clip_min, self.clip_max)
      if not self.through_clamp:  # the gradient at the clamped image, passed to δ
        moved = tf.cast(delta, images.dtype)
        x_adv = tf.stop_gradient(x_adv) + moved - tf.stop_gradient(moved)
      logits = model(x_adv, training=True)
      loss = loss_fn(labels, logits, weights)
    *gradients, delta_gradient = scaled_gradient(tape, loss, variables + [delta])
    # One backward pass, two uses: the weights' update above, δ's ascent here.
    step = self.epsilon * tf.sign(tf.cast(delta_gradient, tf.float32))
    self.perturbation.assign(keep_if_finite(
        tf.clip_by_value(delta + step, -self.epsilon, self.epsilon), delta, gradients))
    return MethodOutput(loss=loss, logits=logits, gradients=gradients)

  def get_config(self):
    return {"epsilon": self.epsilon, "replays": self.batch_replays,
            "clip_min": self.clip_min, "clip_max": self.clip_max,
            "through_clamp": self.through_clamp}


@gin.configurable
class EmbeddingOutputFree(BufferedEmbeddingOutputMethod):
  """Free-m on the embedding outputs: Shafahi et al.'s algorithm for text.

  Each minibatch is replayed m times (`replays`; the input pipeline delivers
  it m times in a row). Every replay is one forward/backward pass on e + δ
  (δ masked at padding) whose gradients serve twice: the weight gradients
  are this replay's update, and g = ∂L/∂δ moves the perturbation,
  δ ← Π_ε(δ + α·g_i/‖g_i‖₂) per example (the ℓ2 form of the paper's
  δ ← clip(δ + ε·sign(g)); α = `step_size`, default ε as in the paper).
  δ lives in a per-replica `tf.Variable` buffer (batch × length × hidden)
  and is carried over to the next minibatch (masked with its padding and
  projected). A replay costs one plain step, and a run of n optimizer steps
  sees n/m batches: `Experiment.train_epochs` divides the epochs by m.

  Deviation from the paper: there δ is an ℓ∞ perturbation of pixels; text
  has no pixel range, and tfadv's other embedding-output methods use
  per-example ℓ2 balls, so this one does too (same ε scale as `FreeLB`).

  Example:
  >>> method = EmbeddingOutputFree(epsilon=1.0, replays=3)
  >>> method.build(classifier, input_shape=(32, 128))  # per-replica batch × length
  """

  buffer_name = "free_output_perturbation"
  name = "free_output"

  def __init__(self, epsilon: float = 1.0, replays: int = 3,
               step_size: float = None, **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    if replays < 1:
      raise ValueError(f"EmbeddingOutputFree.replays={replays}; expected >= 1.")
    self.batch_replays = int(replays)
    self.step_size = float(epsilon if step_size is None else step_size)

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    mask = self._mask(inputs)
    # The carried δ, on this batch's real tokens, inside the ball.
    delta = project(tf.convert_to_tensor(self.perturbation) * mask, self.epsilon)
    loss, logits, gradients, g = self._full_pass(model, loss_fn, inputs, labels,
                                                 weights, delta, mask)
    # One backward pass, two uses: the weights' update above, δ's ascent here.
    moved = project(delta + self.step_size * normalize(g * mask), self.epsilon) * mask
    self.perturbation.assign(keep_if_finite(tf.stop_gradient(moved), delta, gradients))
    return MethodOutput(loss=loss, logits=logits, gradients=gradients, metrics={
        "delta_norm": tf.reduce_mean(per_example_norm(delta))})

  def get_config(self):
    return {**super().get_config(), "replays": self.batch_replays,
            "step_size": self.step_size}
