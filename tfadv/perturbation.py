"""Per-example perturbation geometry: norms, ascent directions, projections, random starts.

One module for every method and attack that moves a perturbation δ inside
an ε-ball around each example: input-space attacks (`tfadv.attacks`: images,
batch × height × width × channels) and the embedding-output methods
(`tfadv.methods.embedding_output`, `freelb`, `free`: batch × length ×
hidden, with a mask of real tokens). "Per example" means over all axes but
the first.

Example:
>>> g = tf.constant([[3.0, 4.0], [0.0, 0.0]])
>>> normalize(g, "l2").numpy()          # g_i / ‖g_i‖₂, zero stays zero
array([[0.6, 0.8],
       [0. , 0. ]], dtype=float32)
>>> project(tf.constant([[3.0, 4.0]]), 1.0, "l2").numpy()
array([[0.6, 0.8]], dtype=float32)
"""

import contextlib
from typing import Optional

import tensorflow as tf

NORMS = ("l2", "linf")
TINY = 1e-12

_EPSILON_SCALE = []  # the ε ramp's scale of the step being built (`epsilon_scaling`)


@contextlib.contextmanager
def epsilon_scaling(scale):
  """Within the block, `ramped(v)` is v·scale (a float32 scalar, or None: no
  ramp). `apply_method` opens it around a training step's
  `compute_gradients` (the ε ramp, `Trainer.epsilon_ramp_steps`);
  evaluation attacks run outside it, at their full ε."""
  _EPSILON_SCALE.append(scale)
  try:
    yield
  finally:
    _EPSILON_SCALE.pop()


def ramped(value):
  """A perturbation size (ε, an ascent step, an initial magnitude) as it is in
  force this step: `value` times the ε ramp's scale, or `value` without one."""
  scale = _EPSILON_SCALE[-1] if _EPSILON_SCALE else None
  return value if scale is None else value * scale


def token_mask(inputs, key: Optional[str], owner: str) -> tf.Tensor:
  """[batch, length, 1] float mask of real tokens: `inputs[key]`, or all ones if key is None.

  `owner` names the method or attack in the error a missing key raises.
  """
  if key is None:
    ids = inputs if not isinstance(inputs, dict) else next(iter(inputs.values()))
    return tf.ones(tf.concat([tf.shape(ids)[:2], [1]], 0), tf.float32)
  if not isinstance(inputs, dict) or key not in inputs:
    raise ValueError(f"{owner}: no input {key!r} to mask padding with; set "
                     "`padding_mask_key` (None: no mask).")
  return tf.cast(inputs[key], tf.float32)[..., None]


def per_example(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """A [batch] tensor shaped to broadcast against `like` (batch × ...)."""
  return tf.reshape(values, [-1] + [1] * (len(like.shape) - 1))


def per_example_norm(x: tf.Tensor) -> tf.Tensor:
  """‖x_i‖₂ over all but the batch axis, shaped to broadcast against x."""
  return tf.sqrt(tf.reduce_sum(tf.square(x), axis=list(range(1, len(x.shape))),
                               keepdims=True))


def normalize(gradient: tf.Tensor, norm: str = "l2") -> tf.Tensor:
  """The steepest-ascent unit step: g_i/‖g_i‖₂ ("l2"; zero stays zero) or sign(g) ("linf")."""
  if norm == "linf":
    return tf.sign(gradient)
  return gradient / (per_example_norm(gradient) + TINY)


def project(delta: tf.Tensor, epsilon: float, norm: str = "l2") -> tf.Tensor:
  """δ onto each example's ε-ball: scaled back onto the sphere (ℓ2) or clipped (ℓ∞)."""
  if norm == "linf":
    return tf.clip_by_value(delta, -epsilon, epsilon)
  return delta * tf.minimum(1.0, epsilon / (per_example_norm(delta) + TINY))


def feasible_box(images, epsilon: float, clip_min: float, clip_max: float):
  """The box δ may take for these images under ℓ∞: [max(−ε, lo − x), min(ε, hi − x)]."""
  images = tf.cast(images, tf.float32)
  return (tf.maximum(-epsilon, clip_min - images), tf.minimum(epsilon, clip_max - images))


def random_start(shape, epsilon: float, norm: str, rng: tf.random.Generator,
                 mask: Optional[tf.Tensor] = None, radius: str = "volume",
                 dtype=tf.float32) -> tf.Tensor:
  """A random δ of `shape` in each example's ε-ball, zero where `mask` is 0.

  ℓ∞: uniform in the cube. ℓ2: a uniform direction (a masked Gaussian,
  normalised) at radius ε·u^(1/d), u ~ U(0, 1) and d the example's unmasked
  entries, which is uniform in the ball's volume (`radius="volume"`), or at
  radius U(0, ε) (`radius="uniform"`, Madry et al.'s ℓ2 start as most
  attack code draws it).
  """
  shape = tf.convert_to_tensor(shape)
  if norm == "linf":
    delta = rng.uniform(shape, -epsilon, epsilon, dtype=dtype)
    return delta if mask is None else delta * tf.cast(mask, dtype)
  direction = rng.normal(shape, dtype=dtype)
  if mask is not None:
    direction *= tf.cast(mask, dtype)
  direction = normalize(direction)
  ones = tf.ones(tf.shape(shape) - 1, tf.int32)
  u = rng.uniform(tf.concat([shape[:1], ones], 0), dtype=dtype)
  if radius == "uniform":
    return epsilon * u * direction
  if mask is None:
    dims = tf.cast(tf.reduce_prod(shape[1:]), dtype)
  else:
    dims = tf.reduce_sum(tf.cast(mask, dtype) * tf.ones(shape, dtype),
                         axis=list(range(1, direction.shape.rank)), keepdims=True)
  return epsilon * direction * tf.pow(u, 1.0 / tf.maximum(dims, 1.0))


def stuck_share(gradient, mask=None):
  """The share of δ's entries (real tokens only, with `mask`) whose ascent
  gradient is exactly zero: entries that cannot move this step."""
  zero = tf.cast(tf.equal(gradient, 0.0), tf.float32)
  if mask is None:
    return tf.reduce_mean(zero)
  mask = tf.cast(mask, tf.float32) * tf.ones_like(zero)
  return tf.reduce_sum(zero * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
