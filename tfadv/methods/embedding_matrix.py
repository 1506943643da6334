"""Shared pieces of the embedding-matrix methods (FGM, gradient penalty).

The gradient of a loss with respect to a token-embedding matrix E arrives as
`tf.IndexedSlices`: one row per token occurrence in the batch, duplicates
included. The gradient *of the matrix* is the sum of those rows per token, so
its norm needs the duplicates combined. Two ways, chosen by `combine`:

- `"dense"` (the default): one `unsorted_segment_sum` of the occurrence rows
  into E's shape (vocabulary × hidden), exactly what `tf.convert_to_tensor`
  does to an `IndexedSlices` and what the trainer already does to apply the
  update. It compiles to one scatter-add under XLA and is as fast as the
  hand-written dense FGM there and without XLA (docs/results/step-time.md, both sizes).
- `"sorted"`: a sort and a segment sum over the occurrences (static sizes, no
  vocabulary-sized tensor). Without XLA it costs about the same; under XLA
  on CPU the sort and gathers are fused into the backward pass and make the
  step ~10× slower, so it is kept only for comparison.
"""

from typing import List, Tuple

import keras
import tensorflow as tf

from tfadv import checks

COMBINE = ("dense", "sorted")
# keras-hub's BERT token-embedding matrix (`backbone.token_embedding.embeddings`).
TOKEN_EMBEDDING = "token_embedding/embeddings"


def check_combine(owner: str, combine: str) -> None:
  checks.check(owner, combine=(combine, checks.one_of(COMBINE)))


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


def dense_gradient(gradient, num_rows) -> tf.Tensor:
  """The matrix gradient as a dense tensor: duplicate rows summed."""
  if isinstance(gradient, tf.IndexedSlices):
    return tf.math.unsorted_segment_sum(gradient.values, gradient.indices, num_rows)
  return tf.convert_to_tensor(gradient)


def as_indexed_slices(gradient) -> tf.IndexedSlices:
  if isinstance(gradient, tf.IndexedSlices):
    return gradient
  return tf.IndexedSlices(gradient, tf.range(tf.shape(gradient)[0]),
                          tf.shape(gradient, out_type=tf.int64))


def combine_rows(gradient: tf.IndexedSlices) -> Tuple[tf.Tensor, tf.Tensor]:
  """Sums the rows of `gradient` that share an index (the "sorted" way).

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


def squared_norm(gradient, num_rows, combine: str = "dense") -> tf.Tensor:
  """‖g‖² of the matrix gradient (duplicate rows combined, `combine` way)."""
  if not isinstance(gradient, tf.IndexedSlices):
    return tf.reduce_sum(tf.square(gradient))
  if combine == "sorted":
    _, rows = combine_rows(gradient)
  else:
    rows = dense_gradient(gradient, num_rows)
  return tf.reduce_sum(tf.square(rows))


def index_of(variables: List[tf.Variable], variable) -> int:
  for i, v in enumerate(variables):
    if v is variable:
      return i
  raise ValueError(f"{variable.path} is not among the trainable variables.")
