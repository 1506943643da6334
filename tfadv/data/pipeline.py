"""Step-indexed, deterministic input pipelines for any `tf.distribute` strategy.

The example seen at global position p (p = step * global_batch + row) is
`index_shuffle(p mod n, seed=[seed, p div n])`: a fresh permutation each
epoch, computed from the position alone. A run resumed at step s therefore
starts its input at position s * global_batch and sees exactly the batches an
uninterrupted run would have seen; no iterator state is checkpointed.

Each replica receives rows [g * b, (g + 1) * b) of every global batch, where g
is its global replica index and b the per-replica batch, so N replicas see the
same global batches as one device, on any number of workers.

Every batch also carries `example_index`: for training, the row of the
training arrays each example came from (what `index_shuffle` chose; methods
with per-example state, `tfadv.methods.atta`, key it by this); for
evaluation, the position in the split (0 on padding rows); and
`replay_index`: which of its `repeats_per_batch` deliveries a batch is (0 for
the first; always 0 without replays), so a method that replays batches
(Free on text) knows a new batch from the step alone.
"""

from typing import Callable, Dict, Optional, Union

import numpy as np
import tensorflow as tf

from tfadv.data.sources import ArraySource, ExampleSource

WEIGHTS = "example_weight"
EXAMPLE_INDEX = "example_index"
REPLAY_INDEX = "replay_index"


def _per_replica_rows(context: tf.distribute.InputContext, global_batch_size: int):
  per_replica = context.get_per_replica_batch_size(global_batch_size)
  replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
  first_replica = context.input_pipeline_id * replicas_per_pipeline
  return per_replica, first_replica, replicas_per_pipeline


def distributed_dataset(strategy: tf.distribute.Strategy,
                        source: Union[ExampleSource, Dict[str, np.ndarray]],
                        global_batch_size: int,
                        *, shuffle: bool, seed: int = 0, start_step: int = 0,
                        num_steps: Optional[int] = None,
                        repeats_per_batch: int = 1,
                        augment_fn: Optional[Callable] = None,
                        eval_fn: Optional[Callable] = None):
  """Builds the distributed dataset of a source's rows.

  Args:
    strategy: the strategy whose replicas consume the batches.
    source: an `ExampleSource` of n rows, or {name: array} (equal-length
      numpy arrays, read as an `ArraySource`).
    global_batch_size: examples per step across all replicas.
    shuffle: training order (reshuffled each epoch, endless) when True;
      evaluation order (each example once, in order) when False. The last
      evaluation batch is padded with `example_weight` 0 to keep shapes static.
    seed: seed of the training order.
    start_step: first global step to produce (resume point). With replays,
      steps count replays: step s carries batch s // repeats_per_batch, so a
      run resumed in the middle of a batch's replays finishes them.
    num_steps: number of steps; defaults to endless for training and one pass
      for evaluation.
    repeats_per_batch: each batch is produced this many times in a row
      (minibatch replay, as Free adversarial training needs).
    augment_fn: `(per_replica_batch, seed) -> batch`, applied to training
      batches with a seed [2] derived from the batch's position, so that
      augmentation too is a function of the step alone.
    eval_fn: `(per_replica_batch) -> batch`, applied to evaluation batches
      (decoding and a centre crop, for a source of encoded images).

  Returns:
    A distributed dataset yielding dicts with the source's features plus
    `example_weight`, `example_index` (int32: the row of the source) and
    `replay_index` (int32: the delivery of the batch, 0 to
    `repeats_per_batch` − 1).
  """
  if global_batch_size % strategy.num_replicas_in_sync:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible "
                     f"by the {strategy.num_replicas_in_sync} replicas.")
  return strategy.distribute_datasets_from_function(input_fn(
      source, global_batch_size, shuffle=shuffle, seed=seed, start_step=start_step,
      num_steps=num_steps, repeats_per_batch=repeats_per_batch, augment_fn=augment_fn,
      eval_fn=eval_fn))


def input_fn(source: Union[ExampleSource, Dict[str, np.ndarray]],
             global_batch_size: int, *, shuffle: bool, seed: int = 0,
             start_step: int = 0, num_steps: Optional[int] = None,
             repeats_per_batch: int = 1, augment_fn: Optional[Callable] = None,
             eval_fn: Optional[Callable] = None):
  """`(InputContext) -> tf.data.Dataset`: one input pipeline's batches (its
  replicas' rows only), as `distributed_dataset` (which has the arguments)
  gives each pipeline."""
  if not isinstance(source, ExampleSource):
    source = ArraySource(source)
  n = source.num_examples
  if num_steps is None and not shuffle:
    num_steps = -(-n // global_batch_size)

  def dataset_fn(context: tf.distribute.InputContext):
    per_replica, first_replica, local_replicas = _per_replica_rows(
        context, global_batch_size)
    steps = tf.data.Dataset.range(start_step, start_step + num_steps) if num_steps \
        else tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)

    def positions_of(step):
      # The rows of `step`'s global batch that this pipeline's replicas take,
      # with the step's replay of that batch.
      batch_step, replay = step // repeats_per_batch, step % repeats_per_batch
      first = batch_step * global_batch_size + first_replica * per_replica
      return tf.data.Dataset.range(first, first + local_replicas * per_replica).map(
          lambda position: (position, replay))

    def index_and_weight(position, replay):
      if shuffle:
        seed_vector = tf.stack([tf.cast(seed, tf.int64), position // n])
        index = tf.random.experimental.index_shuffle(position % n, seed_vector,
                                                     max_index=n - 1)
        return index, tf.constant(1.0), position, replay
      valid = position < n
      return tf.where(valid, position, 0), tf.cast(valid, tf.float32), position, replay

    def gather(index, weight, position, replay):
      batch = source.read(index)
      if augment_fn is not None and shuffle:
        batch = augment_fn(batch, tf.stack([tf.cast(seed, tf.int64), position[0]]))
      elif eval_fn is not None and not shuffle:
        batch = eval_fn(batch)
      batch[WEIGHTS] = weight
      batch[EXAMPLE_INDEX] = tf.cast(index, tf.int32)
      batch[REPLAY_INDEX] = tf.cast(replay, tf.int32)
      return batch

    ds = (steps.flat_map(positions_of)
          .map(index_and_weight)
          .batch(per_replica, drop_remainder=True)
          .map(gather, num_parallel_calls=tf.data.AUTOTUNE))
    return ds.prefetch(tf.data.AUTOTUNE)

  return dataset_fn
