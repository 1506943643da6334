"""The runner: in-graph train and evaluation steps under a `tf.distribute` strategy.

In the style of orbit's runners, a `Trainer` exposes `train(num_steps)` and
`evaluate()`; the `Controller` owns the loop, checkpoints and summaries.
Every train step is one `strategy.run` of a per-replica function inside a
`tf.function`; `num_steps` of them run in one in-graph loop, so the host
touches the device once per loop, not once per step.
"""

import functools
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf
from absl import logging

from tfadv import compat, perturbation
from tfadv.attacks import attack_outputs
from tfadv.data.pipeline import EXAMPLE_INDEX, REPLAY_INDEX, WEIGHTS
from tfadv.loss_scaling import loss_scale, loss_scaling_by
from tfadv.methods.base import Method
from tfadv.methods.plain import Plain
from tfadv.tasks.base import count_correct

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN
# With several evaluation attacks, `accuracy_worst_case` counts the examples
# that every attack leaves correctly classified.
WORST_CASE = "worst_case"


def _host_flag() -> tf.Variable:
  """A boolean variable outside any strategy: the host sets it, the loop reads it."""
  with tf.init_scope():
    return tf.Variable(False, trainable=False, name="stop_requested")


def apply_method(method: Method, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, loss_fn: Callable,
                 inputs, labels, weights, sparse_reduce: bool = False,
                 example_ids=None, replay_index=None, epsilon_scale=None):
  """One optimizer update of `model` by `method` from one replica's batch.

  The method returns per-replica gradients; they are all-reduced here, once
  (dense: the optimizer densifies embedding gradients anyway, and sparse
  all-gathers of differently sized IndexedSlices can be paired up wrongly
  between replicas by the collective executor), and applied. Shared by the
  custom loop (`Trainer`) and `model.fit` (`tfadv.keras`), so both take the
  same step.

  Under `mixed_float16` the optimizer is a `keras.optimizers.LossScaleOptimizer`:
  the method differentiates the scaled loss (`tfadv.loss_scaling`),
  the optimizer unscales the reduced gradients and skips a step whose
  gradients are not finite, as Keras's own `fit` does.

  `sparse_reduce=True` all-reduces `IndexedSlices` gradients (an embedding
  table's) as the rows the batch touched instead of densely; measured slower
  on one host (docs/results/step-time.md, "Multi-replica cost"), and kept for
  measurement only.

  `example_ids` (the batch's training-split rows) go to a method that
  declares `uses_example_ids`, and only to it; `replay_index` (which of the
  batch's replays this step is) to one that declares `uses_replay_index`.
  `epsilon_scale` (a float32 scalar; None: none) scales every perturbation
  size the method puts in force this step (`tfadv.perturbation.ramped`: the
  ε ramp).

  Returns the method's output and the global norm of the (unscaled) reduced
  gradients.
  """
  compat.skip_optimizer_all_reduce(optimizer)
  extra = {}
  for wanted, keyword, value, what in (
      (method.uses_example_ids, "example_ids", example_ids, "example indices (`example_index`"),
      (method.uses_replay_index, "replay_index", replay_index, "replay index (`replay_index`")):
    if wanted:
      if value is None:
        raise ValueError(f"{type(method).__name__} needs each batch's {what}, produced "
                         "by tfadv.data.pipeline.distributed_dataset).")
      extra[keyword] = value
  with loss_scaling_by(optimizer), perturbation.epsilon_scaling(epsilon_scale):
    out = method.compute_gradients(model, loss_fn, inputs, labels, weights, **extra)
    scale = loss_scale()
  variables = model.trainable_variables
  present = [i for i, g in enumerate(out.gradients) if g is not None]
  context = tf.distribute.get_replica_context()
  grads = [out.gradients[i] for i in present]
  if sparse_reduce:
    reduced = [_dense(g) for g in context.all_reduce(SUM, grads)]
  else:
    reduced = context.all_reduce(SUM, [_dense(g) for g in grads])
  optimizer.apply_gradients(zip(reduced, [variables[i] for i in present]))
  return out, tf.linalg.global_norm(reduced) / scale


def configured_epsilon(method: Method) -> float:
  """The method's configured ε (its attack's, for the image PGD methods)."""
  epsilon = getattr(method, "epsilon", None)
  if epsilon is None:
    epsilon = getattr(getattr(method, "attack", None), "epsilon", 0.0)
  return float(epsilon)


def _correct(labels, logits):
  """Per example: is the arg-max class the label?"""
  return tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)


def _weighted_count(flags, weights):
  return tf.reduce_sum(tf.cast(flags, tf.float32) * weights)


def _dense(gradient):
  return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


class Trainer:
  """Trains and evaluates `model` with `method` under `strategy`.

  Args:
    strategy: the `tf.distribute.Strategy`; model, optimizer and method
      variables must have been created under its scope.
    model: a Keras model mapping a batch's inputs to logits.
    optimizer: a built Keras optimizer.
    method: the training method (`tfadv.methods`).
    split_batch: maps a batch dict to `(inputs, labels)`.
    per_example_loss: `(labels, logits) -> per-example loss`.
    global_batch_size: examples per step over all replicas.
    jit_compile: compile each per-replica step with XLA. Used as given on
      one device and TPU; under Mirrored/MultiWorker strategies the step's
      cross-replica reductions run outside XLA, so it is turned off there.
    eval_jit_compile: compile the evaluation step (with its attacks) with
      XLA; None: as `jit_compile`. On CPU the robust evaluation (FGSM,
      PGD-20, two APGD-100) compiled took 716 s for 1,000 images against
      68 s uncompiled (docs/images.md), so a table that times compiled
      training may evaluate uncompiled.
    eval_attacks: `{name: attack}` (`tfadv.attacks.InputAttack`, `APGD`):
      evaluation also reports `accuracy_<name>` on each attack's adversarial
      inputs and, with two or more attacks, `accuracy_worst_case`: the
      examples that no attack breaks (per example, the worst case). An
      example counts as robust only if it is also classified correctly
      clean. Under `mixed_float16` the attacks' gradients are taken of the
      loss times the optimizer's loss scale (`tfadv.loss_scaling`).
      The attacks' random starts restart from `eval_seed` at every
      evaluation, so evaluating the same weights twice gives the same numbers.
    count_correct: `(labels, logits, example_weights) -> (hits, count)`;
      accuracy is hits / count (default: classification accuracy; a masked
      LM counts masked tokens).
    accuracy_name: the name accuracy is reported under.
    sparse_reduce: all-reduce embedding gradients as touched rows
      (`apply_method`); off by default, being slower where measured.
    adversarial_start_step: steps before it are plain training steps (a
      warm-up: FreeLB users report NaN when adversarial steps start at once,
      zhuchen03/FreeLB#19); the method's buffers are neither read nor
      written then. The scalar `adversarial` (0 or 1) says which ran. With
      a method that replays each batch m times (Free) it is rounded up to a
      multiple of m, so the method starts at a new batch.
    epsilon_ramp_steps: R > 0 ramps the method's perturbation sizes (ε, and
      the ascent steps and initial magnitudes that go with it; Su's penalty
      weight; R3F's σ) linearly from ε/R at `adversarial_start_step` to ε
      at R − 1 steps later; evaluation attacks keep their full ε. The
      scale is a function of the checkpointed step, so resume is exact.
      TensorBoard shows `epsilon_scale` and `epsilon` (the ε in force).
  """

  def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, method: Method,
               split_batch: Callable, per_example_loss: Callable,
               global_batch_size: int, jit_compile: bool = False,
               eval_jit_compile: Optional[bool] = None,
               eval_attacks: Optional[Dict] = None, eval_seed: int = 1234,
               count_correct: Callable = count_correct,
               accuracy_name: str = "accuracy", sparse_reduce: bool = False,
               adversarial_start_step: int = 0, epsilon_ramp_steps: int = 0):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.method = method
    self.split_batch = split_batch
    self.per_example_loss = per_example_loss
    self.global_batch_size = global_batch_size
    self.count_correct = count_correct
    self.accuracy_name = accuracy_name
    self.sparse_reduce = sparse_reduce
    multi_replica_host = isinstance(strategy, (
        tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy))
    if jit_compile and multi_replica_host:
      logging.info("jit_compile is off under %s: its all-reduce runs outside "
                   "XLA.", type(strategy).__name__)
      jit_compile = False
    eval_jit_compile = jit_compile if eval_jit_compile is None else (
        eval_jit_compile and not multi_replica_host)
    self.jit_compile = jit_compile
    compat.skip_optimizer_all_reduce(optimizer)
    self.eval_attacks = dict(eval_attacks or {})
    self.eval_seed = eval_seed
    with strategy.scope():
      self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="global_step")
      self._eval_rng = tf.random.Generator.from_seed(eval_seed)
    # Set from outside the loop (a SIGTERM watcher thread); the in-graph loop
    # checks it before every step, agreed over all workers.
    self.stop_requested = _host_flag()
    # Seconds spent training, over every process that trained this model
    # (checkpointed; the controller adds each process's share at each save).
    with tf.init_scope():
      self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                       name="train_seconds")
    replica_train = tf.function(self._replica_train_step, jit_compile=jit_compile)
    replica_eval = tf.function(self._replica_eval_step, jit_compile=eval_jit_compile)
    self._replica_train = replica_train
    self._replica_eval = replica_eval
    self._train_loop = tf.function(self._train_loop_fn)
    # Warm-up: steps before `adversarial_start_step` are plain steps (their
    # own compiled loop; a loop never spans the start).
    # A method that replays each batch (Free) starts at a new batch: its
    # buffers begin at replay 0, not mid-batch from a zero buffer.
    replays = method.batch_replays
    self.adversarial_start_step = -(-int(adversarial_start_step) // replays) * replays
    if self.adversarial_start_step != adversarial_start_step:
      logging.info("adversarial_start_step %d -> %d: %s replays each batch %d times and "
                   "starts at a new batch.", adversarial_start_step,
                   self.adversarial_start_step, type(method).__name__, replays)
    if epsilon_ramp_steps < 0:
      raise ValueError(f"epsilon_ramp_steps={epsilon_ramp_steps}; expected >= 0.")
    self.epsilon_ramp_steps = int(epsilon_ramp_steps)
    if self.adversarial_start_step > 0:
      self._plain_method = Plain()
      self._replica_plain = tf.function(self._replica_plain_step, jit_compile=jit_compile)
      self._plain_loop = tf.function(functools.partial(self._train_loop_fn, plain=True))
    # Attacks proper (not a defence's own predictions): the worst case is over them.
    self._num_attacks = sum(not getattr(a, "predicts_alone", False)
                            for a in self.eval_attacks.values())
    self._eval_loop = tf.function(self._eval_loop_fn)

  def _loss_fn(self, labels, logits, weights):
    per_example = self.per_example_loss(labels, tf.cast(logits, tf.float32))
    return tf.reduce_sum(per_example * weights) / self.global_batch_size

  def _replica_train_step(self, batch):
    return self._replica_step(batch, self.method)

  def _replica_plain_step(self, batch):  # a warm-up step
    return self._replica_step(batch, self._plain_method)

  def _epsilon_scale(self):
    """The ε ramp's scale this step, (s − start + 1)/R capped at 1 (None: no ramp)."""
    if self.epsilon_ramp_steps == 0:
      return None
    done = tf.cast(self.global_step.read_value() - self.adversarial_start_step + 1,
                   tf.float32)
    return tf.clip_by_value(done / self.epsilon_ramp_steps, 0.0, 1.0)

  def _replica_step(self, batch, method):
    inputs, labels = self.split_batch(batch)
    weights = batch[WEIGHTS]
    scale = self._epsilon_scale() if method is self.method else None
    out, grad_norm = apply_method(method, self.model, self.optimizer,
                                  self._loss_fn, inputs, labels, weights,
                                  sparse_reduce=self.sparse_reduce,
                                  example_ids=batch.get(EXAMPLE_INDEX),
                                  replay_index=batch[REPLAY_INDEX][0]
                                  if REPLAY_INDEX in batch else None,
                                  epsilon_scale=scale)
    hits, count = self.count_correct(labels, tf.cast(out.logits, tf.float32), weights)
    sums = {"loss": out.loss, "correct": hits, "counted": count}
    means = dict(out.metrics)
    means["grad_norm"] = grad_norm
    if scale is not None:  # TensorBoard: the ε in force
      means["epsilon_scale"] = scale
      means["epsilon"] = scale * configured_epsilon(method)
    if self.adversarial_start_step > 0:  # TensorBoard: 0 in the warm-up, 1 after
      means["adversarial"] = tf.constant(0.0 if method is getattr(
          self, "_plain_method", None) else 1.0)
    return sums, means

  def _replica_eval_step(self, batch):
    inputs, labels = self.split_batch(batch)
    weights = batch[WEIGHTS]
    logits = tf.cast(self.model(inputs, training=False), tf.float32)
    per_example = self.per_example_loss(labels, logits)
    hits, count = self.count_correct(labels, logits, weights)
    sums = {"loss": tf.reduce_sum(per_example * weights), "correct": hits,
            "counted": count, "examples": tf.reduce_sum(weights)}
    if not self.eval_attacks:
      return sums
    # Robust implies clean-correct, per example (AutoAttack seeds its robust
    # flags from clean accuracy): a misclassified example never counts as
    # robust, whatever the attack's iterates do.
    clean_correct = _correct(labels, logits)
    worst = clean_correct
    # Attacks differentiate the loss times the optimizer's loss scale
    # (float16: unscaled gradients of confident examples underflow to zero).
    with loss_scaling_by(self.optimizer):
      for name, attack in self.eval_attacks.items():
        adv_logits, extra = attack_outputs(
            attack, self.model, inputs, labels, self._eval_rng, self.per_example_loss)
        held = _correct(labels, tf.cast(adv_logits, tf.float32))
        if getattr(attack, "predicts_alone", False):
          # A defence's own prediction (smoothing): right or wrong whatever the
          # base model says, and no attack of the worst case.
          sums[f"correct_{name}"] = _weighted_count(held, weights)
        else:
          held = tf.logical_and(clean_correct, held)
          sums[f"correct_{name}"] = _weighted_count(held, weights)
          worst = tf.logical_and(worst, held)
        if getattr(attack, "per_example_metrics", None):  # TextAttack's: over attacked or broken
          over = {"attacked": clean_correct,
                  "successful": tf.logical_and(clean_correct, ~held),
                  "all": tf.ones_like(clean_correct)}
          sums[f"attacked_{name}"] = _weighted_count(clean_correct, weights)
          for metric, among in attack.per_example_metrics.items():
            sums[f"{name}_{metric}"] = tf.reduce_sum(
                tf.cast(extra[metric], tf.float32) * weights * tf.cast(over[among], tf.float32))
    if self._num_attacks > 1:
      # Per example, the worst case over the attacks: correct under all of them.
      sums[f"correct_{WORST_CASE}"] = _weighted_count(worst, weights)
    return sums

  def _reduce(self, per_replica, op):
    return tf.nest.map_structure(
        lambda v: self.strategy.reduce(op, v, axis=None), per_replica)

  def _train_one(self, iterator, plain=False):
    replica_fn = self._replica_plain if plain else self._replica_train
    sums, means = self.strategy.run(replica_fn, args=(next(iterator),))
    self.global_step.assign_add(1)
    return self._reduce(sums, SUM), self._reduce(means, MEAN)

  def _stop_flag(self):
    return tf.cast(self.stop_requested.read_value(), tf.int32)

  def _should_stop(self):
    # Every worker must take the same number of steps (their all-reduces
    # pair up), so a stop seen by any worker stops all of them: the sum of
    # the 0/1 flags is > 0 iff any is set.
    if compat.in_multi_worker_mode(self.strategy):
      flags = self.strategy.run(self._stop_flag)
      return self.strategy.reduce(SUM, flags, axis=None) > 0
    return self.stop_requested.read_value()

  def _train_loop_fn(self, iterator, num_steps, plain=False):
    # The first step fixes the structure of the accumulators for the loop.
    sums, means = self._train_one(iterator, plain)
    done = tf.constant(1, tf.int64)
    stop = self._should_stop()
    while done < num_steps and not stop:
      step_sums, step_means = self._train_one(iterator, plain)
      sums = tf.nest.map_structure(tf.add, sums, step_sums)
      means = tf.nest.map_structure(tf.add, means, step_means)
      done += 1
      stop = self._should_stop()
    return sums, means, done

  def train(self, iterator, num_steps: int) -> Dict[str, float]:
    """Runs `num_steps` train steps; returns metrics averaged over them.

    Stops early, at a step boundary, when `stop_requested` is set (then
    `metrics["steps"]` < `num_steps`), and at `adversarial_start_step`: the
    warm-up's plain steps and the method's steps are separate loops (the
    caller continues from the step reached).
    """
    loop = self._train_loop
    step = int(self.global_step.numpy())
    if step < self.adversarial_start_step:
      loop = self._plain_loop
      num_steps = min(num_steps, self.adversarial_start_step - step)
    sums, means, done = loop(iterator, tf.constant(num_steps, tf.int64))
    done = int(done)
    sums = {k: float(v) for k, v in sums.items()}
    metrics = {"loss": sums["loss"] / done,
               self.accuracy_name: sums["correct"] / max(sums["counted"], 1.0)}
    metrics.update({k: float(v) / done for k, v in means.items()})
    metrics["steps"] = done
    return metrics

  def _eval_loop_fn(self, iterator, num_steps):
    sums = self._reduce(self.strategy.run(self._replica_eval, args=(next(iterator),)), SUM)
    for _ in tf.range(num_steps - 1):
      step = self._reduce(self.strategy.run(self._replica_eval, args=(next(iterator),)), SUM)
      sums = tf.nest.map_structure(tf.add, sums, step)
    return sums

  def evaluate(self, iterator, num_steps: int) -> Dict[str, float]:
    """Runs `num_steps` evaluation steps; returns loss and accuracy."""
    if self.eval_attacks:
      self._eval_rng.reset_from_seed(self.eval_seed)
    sums = self._eval_loop(iterator, tf.constant(num_steps, tf.int64))
    sums = {k: float(v) for k, v in sums.items()}
    examples = max(sums["examples"], 1.0)
    counted = max(sums["counted"], 1.0)
    metrics = {"loss": sums["loss"] / examples,
               self.accuracy_name: sums["correct"] / counted,
               "examples": sums["examples"]}
    names = list(self.eval_attacks) + ([WORST_CASE] if self._num_attacks > 1 else [])
    for name in names:
      metrics[f"{self.accuracy_name}_{name}"] = sums[f"correct_{name}"] / counted
    for name, attack in self.eval_attacks.items():
      if getattr(attack, "per_example_metrics", None):
        attacked = sums[f"attacked_{name}"]
        broken = attacked - sums[f"correct_{name}"]
        if not getattr(attack, "predicts_alone", False):
          metrics[f"success_rate_{name}"] = broken / max(attacked, 1.0)
        for metric, among in attack.per_example_metrics.items():
          metrics[f"{name}_{metric}"] = sums[f"{name}_{metric}"] / max(
              {"successful": broken, "all": counted}.get(among, attacked), 1.0)
    return metrics
