"""Shared pieces of the embedding-matrix methods (FGM, gradient penalty).

The gradient of a loss with respect to a token-embedding matrix E arrives as
`tf.IndexedSlices`: one row per token occurrence in the batch, duplicates
included. Its norm is the norm of the *summed* rows, so duplicates must be
combined; `combine_rows` does that with a sort and a segment sum whose sizes
are static (the number of occurrences), so it compiles under XLA and never
builds the vocabulary x hidden dense gradient.
"""

from typing import List, Tuple

import keras
import tensorflow as tf


def find_variable(model: keras.Model, path: str) -> tf.Variable:
  """The model variable whose path is, or ends with, `path`.

  Raises a `ValueError` listing the model's embedding-like variables when
  none matches.
  """
  matches = [v for v in model.trainable_variables
             if v.path == path or v.path.endswith("/" + path)]
  if len(matches) == 1:
    return matches[0]
  candidates = [f"{v.path} {tuple(v.shape)}" for v in model.trainable_variables
                if len(v.shape) == 2 and "embed" in v.path.lower()]
  problem = "matches several variables" if matches else "matches no variable"
  raise ValueError(
      f"Embedding variable {path!r} {problem} of model {model.name!r}. "
      f"Embedding-like variables: {candidates or '(none)'}. Set the method's "
      "`embedding_path` to one of them.")


def combine_rows(gradient: tf.IndexedSlices) -> Tuple[tf.Tensor, tf.Tensor]:
  """Sums the rows of `gradient` that share an index.

  Returns:
    `(indices, rows)` with one entry per occurrence slot: the unique indices
    first (each once), then padding entries whose rows are zero and whose
    index is 0, so that scattering them adds nothing.
  """
  indices = tf.cast(gradient.indices, tf.int32)
  count = tf.shape(indices)[0]
  order = tf.argsort(indices, stable=True)
  sorted_indices = tf.gather(indices, order)
  starts = tf.concat([tf.ones([1], tf.int32), tf.cast(
      sorted_indices[1:] != sorted_indices[:-1], tf.int32)], axis=0)
  segments = tf.cumsum(starts) - 1
  rows = tf.math.unsorted_segment_sum(tf.gather(gradient.values, order), segments, count)
  unique = tf.math.unsorted_segment_max(sorted_indices, segments, count)
  return tf.maximum(unique, 0), rows


def squared_norm(gradient) -> tf.Tensor:
  """‖g‖² of a dense tensor or of IndexedSlices (duplicates combined)."""
  if isinstance(gradient, tf.IndexedSlices):
    _, rows = combine_rows(gradient)
    return tf.reduce_sum(tf.square(rows))
  return tf.reduce_sum(tf.square(gradient))


def index_of(variables: List[tf.Variable], variable) -> int:
  for i, v in enumerate(variables):
    if v is variable:
      return i
  raise ValueError(f"{variable.path} is not among the trainable variables.")
