"""Loss scaling for `mixed_float16`, shared by every method's backward passes.

Every backward pass of a method differentiates the loss times
the optimizer's current loss scale, so that small gradients do not underflow
in float16. The weight gradients a method returns are therefore scaled; the
`keras.optimizers.LossScaleOptimizer` divides them by the same scale, and
skips the update (halving the scale) when any is not finite. Perturbation
directions (g/‖g‖, sign g) do not depend on the scale; a method that needs a
gradient's *value* (the gradient penalty) divides by `loss_scale()`. Without
a loss-scaling optimizer (float32, bfloat16) all of this is a no-op.

Methods take every gradient with `scaled_gradient(tape, loss, sources)`;
`tfadv.trainer.apply_method` opens `loss_scaling_by(optimizer)` around
`compute_gradients`, so methods never see the optimizer.
"""

import contextlib

import keras
import tensorflow as tf

_LOSS_SCALING = []  # the optimizer of the step being built (`loss_scaling_by`)


def _scaling_optimizer(optimizer):
  return optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None


@contextlib.contextmanager
def loss_scaling_by(optimizer):
  """Within the block, `scaled_gradient` and `loss_scale` use `optimizer`'s loss scale
  (when it is a `keras.optimizers.LossScaleOptimizer`). `apply_method` opens
  it around `compute_gradients`."""
  _LOSS_SCALING.append(_scaling_optimizer(optimizer))
  try:
    yield
  finally:
    _LOSS_SCALING.pop()


def loss_scale():
  """The current loss scale (a float32 scalar), or 1.0 without loss scaling."""
  optimizer = _LOSS_SCALING[-1] if _LOSS_SCALING else None
  if optimizer is None:
    return 1.0
  return tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32)


def scaled_gradient(tape: tf.GradientTape, loss, sources):
  """`tape.gradient` of the loss times the current loss scale.

  The scale enters as the output gradient, so the loss need not have been
  multiplied under the tape; without loss scaling this is `tape.gradient`.
  """
  optimizer = _LOSS_SCALING[-1] if _LOSS_SCALING else None
  if optimizer is None:
    return tape.gradient(loss, sources)
  return tape.gradient(loss, sources, output_gradients=tf.cast(loss_scale(), loss.dtype))


def all_finite(tensors, across_replicas: bool = True) -> tf.Tensor:
  """True iff every tensor (an `IndexedSlices`: its values) is finite, on every
  replica when `across_replicas`: the optimizer skips a step when any
  replica's gradients overflow, since it sees their sum."""
  flags = [tf.reduce_all(tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t))
           for t in tensors if t is not None]
  finite = tf.reduce_all(tf.stack(flags))
  context = tf.distribute.get_replica_context()
  if across_replicas and context is not None and context.num_replicas_in_sync > 1:
    overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    1.0 - tf.cast(finite, tf.float32))
    finite = tf.equal(overflowed, 0.0)
  return finite


def keep_if_finite(new, old, gradients=None):
  """`new`, or `old` where the step's gradients overflowed (float16 loss
  scaling: the optimizer skips that step, so persistent buffers must too).

  With `gradients` (the step's weight gradients, per replica) the buffer
  keeps `old` whenever the optimizer will skip the step: `new` or any
  gradient is not finite on any replica. Without, only `new` is checked,
  on this replica (an intermediate δ inside a step).

  A select, not a `tf.cond`: under XLA a conditional over a
  batch × length × hidden buffer cost FreeLB-3 a fifth of a plain step more
  (docs/results/step-time.md).
  """
  if gradients is None:
    return tf.where(all_finite([new], across_replicas=False), new, old)
  return tf.where(all_finite([new, *gradients]), new, old)
