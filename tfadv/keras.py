"""Adversarial training for `model.fit` users: one line on any Keras 3 model.

    model = tfadv.keras.adversarial(model, EmbeddingFGM(epsilon=0.5))
    model.compile(optimizer="adam", loss=..., metrics=["accuracy"])
    model.fit(train_ds, validation_data=dev_ds, callbacks=[...])

`adversarial` gives the model an adversarial `train_step` and returns the
same object: its class, `call`, `predict`, `evaluate`, saving and loading are
untouched, so a trained model saves and reloads as the plain Keras model it
was (loading needs no tfadv). The step is the custom-loop trainer's
(`tfadv.trainer.apply_method`) with the very same method objects:

- `EmbeddingFGM`, `EmbeddingGradientPenalty`: text models with a token
  embedding (keras-hub classifiers; the embedding is found by path).
- `PGDTraining`, `FGSMTraining`: models whose input is one image tensor in
  [0, 1].
- `EmbeddingOutputFGM`, `EmbeddingOutputPGD`: text models, per-example
  perturbations of the embedding layer's output (found by layer name).
- `FreeLB(ascent_steps=K)`: its K ascent passes run inside one step anyway; its
  buffer is batch × length × hidden, so pass `batch_size=` and
  `sequence_length=` and feed batches of exactly that shape.
- `FreeTraining(replays=m)`: `fit` has no minibatch replay, so each `fit`
  step replays its batch m times itself (m optimizer updates per step; divide
  your epochs by m). The perturbation buffer has the shape of one replica's
  batch, so pass `batch_size=` here and give `fit` batches of exactly that
  size (a `tf.data` dataset with `drop_remainder=True`); another size raises.

Losses: the compiled loss must be one per-example Keras loss (e.g.
"sparse_categorical_crossentropy" or `SparseCategoricalCrossentropy(
from_logits=True)`), as adversarial methods need per-example values; one
output, no loss weights. Sample weights work. Under a `tf.distribute`
strategy, call `adversarial` inside `strategy.scope()`, like `compile`.
"""

from typing import Optional

import keras
import tensorflow as tf

from tfadv import compat
from tfadv.methods.base import Method
from tfadv.trainer import apply_method


def _per_example_loss(model: keras.Model):
  loss = getattr(model, "loss", None)
  if loss is None:
    raise ValueError("tfadv.keras.adversarial: compile the model with a loss "
                     "before fit.")
  if isinstance(loss, (list, tuple, dict)):
    raise ValueError(f"tfadv.keras.adversarial needs one loss, got {loss!r}.")
  loss = keras.losses.get(loss)
  if isinstance(loss, keras.losses.Loss):
    return loss.call  # per-example values, no reduction
  return loss


def _adversarial_train_step(self, data):
  x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
  method = self._tfadv_method
  per_example = _per_example_loss(self)
  local = tf.shape(y)[0]
  if self._tfadv_batch_size is not None:
    check = tf.debugging.assert_equal(
        local, self._tfadv_batch_size,
        message=f"{type(method).__name__} keeps a perturbation buffer of "
                f"{self._tfadv_batch_size} rows per replica: feed fit batches of "
                "exactly that size (drop_remainder=True).")
    # Under XLA (Keras's default jit_compile="auto") the assert is dropped;
    # ensure_shape still stops a wrong-sized batch before the buffer is used.
    with tf.control_dependencies([check]):
      # Inputs and labels both: whatever the step computes first, it stops here.
      x, y = tf.nest.map_structure(
          lambda t: tf.ensure_shape(t, [self._tfadv_batch_size] + t.shape[1:]), (x, y))
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  global_batch = tf.cast(local * replicas, tf.float32)
  weights = (tf.ones([local], tf.float32) if sample_weight is None
             else tf.cast(tf.reshape(sample_weight, [-1]), tf.float32))

  def loss_fn(labels, logits, w):
    values = tf.cast(per_example(labels, tf.cast(logits, tf.float32)), tf.float32)
    return tf.reduce_sum(values * w) / global_batch

  for replay in range(method.batch_replays):
    out, _ = apply_method(method, self, self.optimizer, loss_fn, x, y, weights,
                          replay_index=tf.constant(replay, tf.int32))
  # Keras's loss tracker averages over replicas what each replica reports.
  compat.loss_tracker(self).update_state(out.loss * tf.cast(replicas, tf.float32),
                                  sample_weight=local)
  return self.compute_metrics(x, y, out.logits, sample_weight=sample_weight)


def adversarial(model: keras.Model, method: Method,
                batch_size: Optional[int] = None,
                sequence_length: Optional[int] = None) -> keras.Model:
  """Makes `model.fit` train `model` with `method`; returns `model` itself.

  Args:
    model: a built Keras 3 model returning logits.
    method: a `tfadv.methods` object (FGM, GP, PGD, FGSM, Free).
    batch_size: per-replica batch size; required by methods with a
      per-example buffer (`FreeTraining`, `FreeLB`).
    sequence_length: tokens per example, for `FreeLB`'s buffer.

  Example:
  >>> classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=15)
  >>> classifier = tfadv.keras.adversarial(classifier, EmbeddingFGM(epsilon=0.5))
  >>> classifier.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
  ...     from_logits=True), metrics=["accuracy"])
  >>> classifier.fit(train_ds, validation_data=dev_ds, epochs=3)
  >>> classifier.save("model.keras")  # a plain BertTextClassifier
  """
  if not model.built or not model.trainable_variables:
    raise ValueError("tfadv.keras.adversarial: build the model first (call it "
                     "on a batch or give its Input shapes).")
  if method.uses_example_ids:
    raise ValueError(f"tfadv.keras.adversarial: {type(method).__name__} keeps one "
                     "perturbation per training example and needs each batch's "
                     "example indices, which model.fit does not pass: train it with "
                     "`python -m tfadv.main` or `tfadv.experiment.build_trainer`.")
  input_shape = None
  if batch_size is not None and sequence_length is not None:
    input_shape = (batch_size, sequence_length)
  elif batch_size is not None and len(model.inputs or []) == 1:
    input_shape = (batch_size,) + tuple(model.inputs[0].shape[1:])
  if getattr(method, "perturbation", "absent") is None and input_shape is None:
    raise ValueError(f"{type(method).__name__} needs batch_size= (and for text "
                     "sequence_length=): its buffer has the shape of one replica's batch.")
  method.seed_with(0)  # bind the method's `seed` to vary its draws under fit
  method.build(model, input_shape=input_shape)
  model._tfadv_method = method  # pylint: disable=protected-access
  model._tfadv_batch_size = batch_size if input_shape is not None else None  # pylint: disable=protected-access
  compat.replace_train_step(model, _adversarial_train_step)
  return model
