"""The interface between the trainer and an adversarial training method.

The trainer knows only this: a method gets the model, the loss function and
one per-replica batch, and returns the gradients to apply plus the clean
logits and loss for reporting. How it gets there (extra forward/backward
passes, perturbed weights, nested tapes, persistent buffers) is its own
business.

Loss convention: `loss_fn(labels, logits, weights)` returns this replica's
share of the global-batch mean (the sum over its examples divided by the
global batch size). Gradients of that loss, summed over replicas by the
trainer, are the global-batch mean gradient, so N replicas match one device.
A method that needs a global quantity inside the step (FGM's embedding
gradient norm, say) all-reduces it itself through
`tf.distribute.get_replica_context()`.

Per-example state: a method with `uses_example_ids = True` gets, in `build`,
`num_examples` (the size of the training split) and, in `compute_gradients`,
`example_ids`: the training-split row of each example in the batch (int32),
which the step-indexed input pipeline computes anyway (`example_index`,
`tfadv.data.pipeline`). Other methods see neither.

Replays: a method with `batch_replays` m > 1 gets each batch m times in a
row; with `uses_replay_index = True` it also gets, in `compute_gradients`,
`replay_index`: which delivery this is (int32 scalar, 0 for a new batch),
computed by the pipeline from the step (`replay_index`), so a resumed run
knows it too.

Loss scaling (`mixed_float16`): every backward pass of a method
differentiates the scaled loss (`tfadv.loss_scaling.scaled_gradient`), so the weight
gradients a method returns are scaled, and the `LossScaleOptimizer` unscales
them.
"""

import dataclasses
from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf

from tfadv.loss_scaling import scaled_gradient

LossFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]

# The two ways an adversarial method forms its update: from the adversarial
# pass alone, or the clean and adversarial gradients added.
FORMS = ("adversarial", "clean_plus_adversarial")


@dataclasses.dataclass
class MethodOutput:
  """What a method returns for one per-replica batch.

  Attributes:
    loss: the clean loss (per-replica share of the global mean).
    logits: the clean logits, for accuracy.
    gradients: one per `model.trainable_variables` entry (None allowed),
      per replica, not yet all-reduced.
    metrics: the method's own scalars (per replica; the trainer averages
      them over replicas and steps), e.g. `{"adv_loss": ...}`.
  """
  loss: tf.Tensor
  logits: tf.Tensor
  gradients: List[Optional[tf.Tensor]]
  metrics: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)


class Method:
  """Base class of training methods.

  A method that draws random numbers takes `seed=None`: its draws then
  follow the run's seed (`seed_with`); an int binds them on their own.

  Subclasses implement `compute_gradients`; they may create variables in
  `build`, which the experiment calls once under the strategy's scope with
  the per-replica shape of a batch's inputs (when they are one tensor).
  Variables a method lists in `variables` are checkpointed with the model.
  `batch_replays` > 1 asks the input pipeline to deliver each batch that
  many times in a row (Free adversarial training). `uses_example_ids` asks
  for the batch's example indices, `uses_replay_index` for the replay's
  position (module docstring).
  """

  name = "method"
  batch_replays = 1
  uses_example_ids = False
  uses_replay_index = False
  # Keeps a perturbation of each training example's *input* across epochs
  # (ATTA): a random crop or flip would move the example under it.
  keeps_input_perturbations = False

  def build(self, model: keras.Model, input_shape=None) -> None:
    del model, input_shape

  def seed_with(self, run_seed: int) -> None:
    """Derives the method's random draws (random starts, noise, random
    controls, initial memories) from the run's seed (`Experiment.seed`),
    unless the method's own `seed` is bound. `build_trainer` calls it before
    `build`, so three seeds of a table draw three noises, not one.
    """
    self._run_seed = int(run_seed)

  @property
  def draw_seed(self) -> int:
    """The seed of the method's draws: its own `seed` where bound, else the
    run's (`seed_with`), else 0 (a method built outside `build_trainer`)."""
    own = getattr(self, "seed", None)
    return int(own) if own is not None else getattr(self, "_run_seed", 0)

  @property
  def variables(self) -> list:
    return []

  def compute_gradients(self, model: keras.Model, loss_fn: LossFn,
                        inputs, labels, weights) -> MethodOutput:
    raise NotImplementedError

  def get_config(self) -> dict:
    return {}


def clean_gradients(model: keras.Model, loss_fn: LossFn, inputs, labels,
                    weights):
  """One forward/backward pass: (loss, logits, gradients of the scaled loss)."""
  with tf.GradientTape() as tape:
    logits = model(inputs, training=True)
    loss = loss_fn(labels, logits, weights)
  return loss, logits, scaled_gradient(tape, loss, model.trainable_variables)


def add_gradients(clean, adversarial, weight: float = 1.0):
  """clean + weight·adversarial for one variable (either may be None).

  Two `tf.IndexedSlices` (an embedding table's) stay sparse: their rows are
  concatenated, duplicates summed later by the all-reduce or the optimizer.
  """
  if clean is None or adversarial is None:
    return clean if adversarial is None else adversarial
  if isinstance(clean, tf.IndexedSlices) and isinstance(adversarial, tf.IndexedSlices):
    return tf.IndexedSlices(
        tf.concat([clean.values, weight * adversarial.values], 0),
        tf.concat([clean.indices, adversarial.indices], 0), clean.dense_shape)
  return tf.convert_to_tensor(clean) + weight * tf.convert_to_tensor(adversarial)


def replica_mean(loss_share: tf.Tensor) -> tf.Tensor:
  """This replica's mean loss from its share of the global mean (share × replicas).

  Losses follow the convention above (a replica's sum over the global batch
  size); the trainer averages metrics over replicas, so a method reports
  each replica's own mean, and their average is the global mean.
  """
  return loss_share * tf.distribute.get_replica_context().num_replicas_in_sync
