"""Equal-cost random-direction controls of the adversarial methods.

Does the *adversarial direction* help, or would noise of the same size do?
`direction="random"` on `EmbeddingFGM` (the token-embedding matrix) and
`EmbeddingOutputFGM` (each example's embedding output) keeps everything of
the method (ε, norm, padding mask or row support, passes, cost) and replaces
only the direction: the perturbation becomes a uniformly random unit
direction (a normalised Gaussian on the same support) scaled to exactly the
norm the adversarial perturbation has in that step (per example for the
output method; per row of the matrix for the matrix method, so each token's
row, and so each example, meets as much of it as of the adversarial Δ; with
`norm="sign"`, random signs on the entries where the gradient is non-zero).
The clean pass still computes the gradient: its support and norm define the
control, and the control costs what the method costs.

The draws are stateless Philox normals from `(seed, step count)`: the count is a
checkpointed variable the method advances once per step, so resume is exact,
and a per-example draw is made for the whole global batch and sliced by
replica, so N replicas draw the same numbers for the same examples as one
device. R3F's noise (`tfadv.methods.r3f`) is drawn the same way.

Su's gradient penalty has no control of this kind: it penalises ‖∇_E L‖²,
which has no direction to randomise (its expectation over random unit
directions r, E[(r·g)²] = ‖g‖²/d, is the same penalty rescaled).
"""

import tensorflow as tf

from tfadv import checks

DIRECTIONS = ("adversarial", "random")
# TensorFlow's Philox (named: "auto_select" may change). XLA's kernel draws
# another stream from the same seed, so a compiled run's control is another
# (equally random) draw than an uncompiled run's.
ALG = "philox"


def check_direction(owner: str, direction: str) -> None:
  checks.check(owner, direction=(direction, checks.one_of(DIRECTIONS)))


def step_counter() -> tf.Variable:
  """The draws' step count: one value shared by all replicas, checkpointed."""
  return tf.Variable(0, dtype=tf.int64, trainable=False,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                     name="random_direction_step")


def next_seed(seed: int, counter: tf.Variable) -> tf.Tensor:
  """The stateless seed of this step's draw; advances the count."""
  value = tf.identity(counter)
  counter.assign_add(1)
  return tf.stack([tf.constant(seed, tf.int64), value])


def normal(shape, seed) -> tf.Tensor:
  """N(0, 1) of `shape`, the same on every replica (a global quantity)."""
  return tf.random.stateless_normal(shape, seed=seed, alg=ALG)


def per_example_normal(local_shape, seed) -> tf.Tensor:
  """N(0, 1) for this replica's examples: rows of one draw over the global
  batch, so each global row gets the same numbers on any number of replicas."""
  return _per_example(tf.random.stateless_normal, local_shape, seed)


def per_example_uniform(local_shape, seed) -> tf.Tensor:
  """U(−1, 1) for this replica's examples, drawn as `per_example_normal` is."""
  return _per_example(
      lambda shape, seed, alg: tf.random.stateless_uniform(shape, seed, -1.0, 1.0, alg=alg),
      local_shape, seed)


def _per_example(draw, local_shape, seed) -> tf.Tensor:
  context = tf.distribute.get_replica_context()
  local_shape = tf.convert_to_tensor(local_shape)
  rows = local_shape[0]
  full = draw(tf.concat([[rows * context.num_replicas_in_sync], local_shape[1:]], 0),
              seed=seed, alg=ALG)
  start = tf.cast(context.replica_id_in_sync_group, rows.dtype) * rows
  return full[start:start + rows]
