"""Auto-PGD (Croce & Hein 2020) with the cross-entropy and DLR losses."""

from typing import Callable, Optional

import gin
import keras
import tensorflow as tf

from tfadv import checks
from tfadv.attacks.base import NORMS, Attack, ascent_direction, cross_entropy, project
from tfadv.loss_scaling import scaled_gradient
from tfadv.perturbation import per_example, per_example_norm

def dlr_loss(labels, logits):
  """Croce & Hein's difference-of-logits-ratio loss, per example.

  DLR = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12), π sorting z in
  decreasing order; invariant to shifting and scaling the logits. Needs at
  least 3 classes.
  """
  logits = tf.cast(logits, tf.float32)
  top3 = tf.math.top_k(logits, k=3).values
  true = tf.gather(logits, tf.cast(labels, tf.int32), batch_dims=1)
  # The largest logit other than the true class's: the second if y is first.
  other = tf.where(tf.equal(true, top3[:, 0]), top3[:, 1], top3[:, 0])
  return -(true - other) / (top3[:, 0] - top3[:, 2] + 1e-12)


APGD_LOSSES = {"ce": cross_entropy, "dlr": dlr_loss}


def apgd_checkpoints(num_steps: int):
  """{iteration: k} of APGD's step-size checks (as in Croce & Hein's code).

  The first check comes after k = max(⌊0.22·N⌋, 1) iterations; after each,
  the interval shrinks by max(⌊0.03·N⌋, 1) down to max(⌊0.06·N⌋, 1). At a check
  after k iterations the step halves for examples whose loss rose in at most
  ρ·k of them (or whose best loss did not improve since a check that did
  not halve).
  """
  k = max(int(0.22 * num_steps), 1)
  decrement = max(int(0.03 * num_steps), 1)
  minimum = max(int(0.06 * num_steps), 1)
  checks, counter = {}, 0
  for i in range(num_steps):
    counter += 1
    if counter == k:
      checks[i] = k
      k = max(k - decrement, minimum)
      counter = 0
  return checks


@gin.configurable
class APGD(Attack):
  """Auto-PGD (Croce & Hein 2020), an evaluation attack with no step size to tune.

  Follows the authors' code (fra31/auto-attack, `APGDAttack`): a random
  start x + ε·t/‖t‖∞ (t ~ U(−1, 1); ℓ2: x + ε·t/‖t‖₂, t Gaussian), step
  η = 2ε (both norms, as `attack_single_run` sets `step_size = 2 * eps`), momentum
  0.75 (none on the first step), per-example checkpoints that halve η and
  restart from the best point when the loss stalls (`apgd_checkpoints`), and
  per-example bookkeeping: an example counts as broken if the clean input
  or *any* iterate is misclassified (AutoAttack seeds its robust flags from
  clean accuracy, so a misclassified example is never robust). Returned per
  example: the clean input if it is misclassified, else a misclassified
  iterate if one was found, else the iterate of highest loss. Losses: "ce" (cross-entropy) or
  "dlr" (difference of logits ratio, `dlr_loss`).

  Everything runs in-graph (one `tf.while_loop` over the iterations), so it
  compiles with XLA and runs under any strategy (each replica attacks its own
  examples).

  Args:
    epsilon: radius of the ball.
    num_steps: iterations N (100 in AutoAttack).
    loss: "ce" or "dlr".
    norm: "linf" or "l2".
    restarts: independent runs with fresh random starts; each example keeps
      the worst (first run that breaks it).
    rho: the checkpoints' threshold ρ.
    clip_min, clip_max: the pixel range.

  Example:
  >>> apgd = APGD(epsilon=0.1, num_steps=100, loss="dlr")
  >>> x_adv = apgd(model, images, labels, rng=tf.random.Generator.from_seed(0))
  """

  def __init__(self, epsilon: float = 0.1, num_steps: int = 100, loss: str = "ce",
               norm: str = "linf", restarts: int = 1, rho: float = 0.75,
               clip_min: float = 0.0, clip_max: float = 1.0):
    checks.check("APGD", epsilon=(epsilon, checks.NON_NEGATIVE),
                 num_steps=(num_steps, checks.AT_LEAST_ONE),
                 loss=(loss, checks.one_of(APGD_LOSSES)), norm=(norm, checks.one_of(NORMS)),
                 restarts=(restarts, checks.AT_LEAST_ONE), rho=(rho, checks.PROPER_FRACTION))
    checks.check_interval("APGD", "clip_min", clip_min, "clip_max", clip_max)
    self.epsilon = float(epsilon)
    self.num_steps = int(num_steps)
    self.loss = loss
    self.norm = norm
    self.restarts = int(restarts)
    self.rho = float(rho)
    self.clip_min = clip_min
    self.clip_max = clip_max

  def _evaluate(self, model, x, labels):
    """(per-example loss, correct?, ∂loss/∂x) at x, the model in inference mode."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(x)
      logits = tf.cast(model(x, training=False), tf.float32)
      loss = APGD_LOSSES[self.loss](labels, logits)
      total = tf.reduce_sum(loss)
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return loss, correct, scaled_gradient(tape, total, x)

  def _project(self, x_adv, x):
    return project(x_adv, x, self.epsilon, self.norm, self.clip_min, self.clip_max)

  def _start(self, x, rng):
    if self.norm == "linf":
      t = rng.uniform(tf.shape(x), -1.0, 1.0, dtype=x.dtype)
      axes = list(range(1, len(x.shape)))
      t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) + 1e-12)
    else:
      t = rng.normal(tf.shape(x), dtype=x.dtype)
      t = t / (per_example_norm(t) + 1e-12)
    return tf.clip_by_value(x + self.epsilon * t, self.clip_min, self.clip_max)

  def _one_run(self, model, x, labels, rng):
    """(image, broken, final step size), each per example, of one APGD run."""
    batchwise = lambda v: per_example(v, x)
    clean_logits = model(x, training=False)
    clean_wrong = tf.not_equal(tf.argmax(clean_logits, -1, output_type=tf.int32),
                               tf.cast(labels, tf.int32))
    x0 = self._start(x, rng)
    loss, correct, grad = self._evaluate(model, x0, labels)
    step = tf.fill(tf.shape(loss), 2.0 * self.epsilon)
    checks = apgd_checkpoints(self.num_steps)
    is_check = tf.constant([i in checks for i in range(self.num_steps)])
    window = tf.constant([float(checks.get(i, 1)) for i in range(self.num_steps)])
    state = dict(
        i=tf.constant(0), x_adv=x0, x_old=x0, grad=grad, step=step,
        x_best=x0, grad_best=grad, loss_best=loss, loss_prev=tf.zeros_like(loss),
        x_broken=tf.where(batchwise(clean_wrong), x, x0),
        broken=tf.logical_or(clean_wrong, tf.logical_not(correct)),
        increases=tf.zeros_like(loss),
        loss_best_last_check=loss, reduced_last_check=tf.ones_like(loss, tf.bool))

    def body(s):
      i = s["i"]
      momentum = tf.where(i > 0, 0.75, 1.0)
      z = self._project(s["x_adv"] + batchwise(s["step"]) * ascent_direction(s["grad"], self.norm), x)
      x_new = self._project(s["x_adv"] + momentum * (z - s["x_adv"])
                            + (1.0 - momentum) * (s["x_adv"] - s["x_old"]), x)
      loss, correct, grad = self._evaluate(model, x_new, labels)
      newly = tf.logical_and(tf.logical_not(correct), tf.logical_not(s["broken"]))
      x_broken = tf.where(batchwise(newly), x_new, s["x_broken"])
      improved = loss > s["loss_best"]
      x_best = tf.where(batchwise(improved), x_new, s["x_best"])
      grad_best = tf.where(batchwise(improved), grad, s["grad_best"])
      loss_best = tf.where(improved, loss, s["loss_best"])
      # At i = 0 the authors' code compares with an unwritten (zero) entry.
      increases = s["increases"] + tf.cast(loss > s["loss_prev"], tf.float32)

      def checked():
        oscillating = increases <= window[i] * self.rho
        no_progress = tf.logical_and(tf.logical_not(s["reduced_last_check"]),
                                     s["loss_best_last_check"] >= loss_best)
        reduce = tf.logical_or(oscillating, no_progress)
        return (tf.where(reduce, s["step"] / 2.0, s["step"]),
                tf.where(batchwise(reduce), x_best, x_new),
                tf.where(batchwise(reduce), grad_best, grad),
                tf.zeros_like(increases), loss_best, reduce)

      def unchecked():
        return (s["step"], x_new, grad, increases, s["loss_best_last_check"],
                s["reduced_last_check"])

      step, x_next, grad_next, increases, last_best, reduced = tf.cond(
          is_check[i], checked, unchecked)
      return [dict(i=i + 1, x_adv=x_next, x_old=s["x_adv"], grad=grad_next, step=step,
                   x_best=x_best, grad_best=grad_best, loss_best=loss_best,
                   loss_prev=loss, x_broken=x_broken,
                   broken=tf.logical_or(s["broken"], tf.logical_not(correct)),
                   increases=increases, loss_best_last_check=last_best,
                   reduced_last_check=reduced)]

    state = tf.while_loop(lambda s: s["i"] < self.num_steps, body, [state])[0]
    image = tf.where(batchwise(state["broken"]), state["x_broken"], state["x_best"])
    return tf.stop_gradient(image), state["broken"], state["step"]

  def __call__(self, model: keras.Model, x: tf.Tensor, labels: tf.Tensor,
               rng: Optional[tf.random.Generator] = None,
               loss_fn: Optional[Callable] = None) -> tf.Tensor:
    """Adversarial images for `x`; `loss_fn` is ignored (APGD has its own)."""
    del loss_fn
    if rng is None:
      raise ValueError("APGD starts at a random point: pass an rng (tf.random.Generator).")
    best, broken, _ = self._one_run(model, x, labels, rng)
    for _ in range(self.restarts - 1):
      candidate, now, _ = self._one_run(model, x, labels, rng)
      best = tf.where(per_example(broken, x), best, candidate)
      broken = tf.logical_or(broken, now)
    return best

  def get_config(self) -> dict:
    return {"epsilon": self.epsilon, "num_steps": self.num_steps, "loss": self.loss,
            "norm": self.norm, "restarts": self.restarts, "rho": self.rho,
            "clip_min": self.clip_min, "clip_max": self.clip_max}
