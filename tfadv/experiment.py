"""The gin-configured experiment: task + method + optimizer + trainer + controller."""

import functools
import json
import math
import os
import time
from typing import Optional

import gin
import keras
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from tfadv import distribute
from tfadv.controller import Controller
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods.base import Method
from tfadv.methods.plain import Plain
from tfadv.models.state import random_state_variables
from tfadv.optimization import adamw
from tfadv.trainer import Trainer

MODES = ("train", "evaluate", "train_and_evaluate", "export")


def sparse_cross_entropy(labels, logits):
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


@gin.configurable
class Experiment:
  """One run: what to train (`task`), how (`method`), for how long.

  Args:
    task: e.g. `TextClassificationTask`.
    method: a `tfadv.methods.Method`; `None` is plain training.
    train_steps: optimizer steps of the whole run (resume counts on).
    train_epochs: alternatively, epochs of the training split; a method that
      replays each batch m times (Free-m) passes over the data m times less
      often for the same number of optimizer steps: epochs are divided by m.
    global_batch_size: training examples per step over all replicas.
    eval_batch_size: evaluation examples per step (default: training's).
    seed: weights, dropout and data order all follow from it.
    deterministic: enable TensorFlow's deterministic ops (bit-exact resume);
      with jit_compile, XLA's kernels are used as they are.
    jit_compile: compile each per-replica step with XLA.
    steps_per_loop: steps per in-graph loop and progress line.
    checkpoint_every: checkpoint interval in steps.
    eval_every: evaluation interval in steps (0: at the end only).
    max_checkpoints: checkpoints kept in the model dir.
    optimizer_fn: `(total_steps) -> optimizer`, e.g. `@adamw` (default) or
      `@sgd_momentum`.
    eval_attacks: `{name: InputAttack}` for image tasks: evaluation also
      reports `accuracy_<name>` under each attack (robust accuracy).
    mixed_precision: a Keras dtype policy for the model: "mixed_bfloat16"
      (TPU) or "mixed_float16" (GPU): layers compute in 16 bits; variables,
      losses, gradients, perturbations (FGM's Δ, Free's δ, PGD iterates) and
      the optimizer stay float32. With "mixed_float16" the optimizer is
      wrapped in `keras.optimizers.LossScaleOptimizer` (dynamic loss scale,
      steps with non-finite gradients skipped), and every method
      differentiates the scaled loss. None: float32 throughout.
  """

  def __init__(self, task=gin.REQUIRED, method: Optional[Method] = None,
               train_steps: int = 1000, global_batch_size: int = 32,
               eval_batch_size: Optional[int] = None, seed: int = 0,
               deterministic: bool = True, jit_compile: bool = False,
               steps_per_loop: int = 50, checkpoint_every: int = 500,
               eval_every: int = 0, max_checkpoints: int = 3,
               train_epochs: Optional[float] = None, optimizer_fn=adamw,
               eval_attacks: Optional[dict] = None,
               mixed_precision: Optional[str] = None):
    self.task = task
    self.method = method if method is not None else Plain()
    self.train_steps = train_steps
    self.train_epochs = train_epochs
    self.optimizer_fn = optimizer_fn
    self.eval_attacks = dict(eval_attacks or {})
    self.mixed_precision = mixed_precision
    self.global_batch_size = global_batch_size
    self.eval_batch_size = eval_batch_size or global_batch_size
    self.seed = seed
    self.deterministic = deterministic
    self.jit_compile = jit_compile
    # A batch's replays belong in one in-graph loop.
    replays = self.method.batch_replays
    self.steps_per_loop = -(-steps_per_loop // replays) * replays
    self.checkpoint_every = checkpoint_every
    self.eval_every = eval_every
    self.max_checkpoints = max_checkpoints
    self.model = None
    self.controller = None

  def build(self, model_dir: str, strategy: tf.distribute.Strategy, print_fn=None):
    """Creates model, optimizer, trainer and controller; returns the controller."""
    keras.utils.set_random_seed(self.seed)
    if self.deterministic and not self.jit_compile:
      tf.config.experimental.enable_op_determinism()
    elif self.jit_compile and tf_config.is_op_determinism_enabled():
      # TF refuses some XLA kernels under op determinism (MaxPool's gradient);
      # XLA's own CPU/TPU kernels do not depend on thread timing.
      logging.info("jit_compile=True: op determinism left to XLA.")
      tf_config.disable_op_determinism()
    self.strategy = strategy
    print_fn = print_fn or functools.partial(print, flush=True)
    self.task.prepare(model_dir)
    if self.train_epochs is not None:
      self.train_steps = self._steps_for_epochs()
    per_replica_batch = self.global_batch_size // strategy.num_replicas_in_sync
    input_shape = (self.task.input_shape(per_replica_batch)
                   if hasattr(self.task, "input_shape") else None)
    keras.mixed_precision.set_global_policy(self.mixed_precision or "float32")
    with strategy.scope():
      self.model = self.task.build_model()
      self.optimizer = self.optimizer_fn(total_steps=self.train_steps)
      if self.mixed_precision == "mixed_float16":
        self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
      self.optimizer.build(self.model.trainable_variables)
      self.method.build(self.model, input_shape=input_shape)
    self.trainer = Trainer(
        strategy, self.model, self.optimizer, self.method,
        split_batch=self.task.split_batch,
        per_example_loss=getattr(self.task, "per_example_loss", sparse_cross_entropy),
        global_batch_size=self.global_batch_size, jit_compile=self.jit_compile,
        eval_attacks=self.eval_attacks,
        **{k: getattr(self.task, k) for k in ("count_correct", "accuracy_name")
           if hasattr(self.task, k)})
    checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                     global_step=self.trainer.global_step,
                                     random_state=_numbered(random_state_variables(self.model)),
                                     method=_numbered(getattr(self.method, "variables", [])))
    self._train_arrays = None
    self._eval_arrays = None
    self.controller = Controller(
        self.trainer, model_dir, checkpoint,
        train_iterator_fn=self._train_iterator, eval_iterator_fn=self._eval_iterator,
        train_steps=self.train_steps, examples_per_step=self.global_batch_size,
        steps_per_loop=self.steps_per_loop, checkpoint_every=self.checkpoint_every,
        eval_every=self.eval_every, max_checkpoints=self.max_checkpoints,
        is_chief=distribute.is_chief(strategy),
        learning_rate_fn=lambda: float(self.optimizer.learning_rate),
        print_fn=print_fn)
    return self.controller

  def _steps_for_epochs(self) -> int:
    replays = self.method.batch_replays
    arrays = self.task.arrays("train")
    n = len(arrays[next(iter(arrays))])
    batches = math.ceil(self.train_epochs / replays * n / self.global_batch_size)
    return batches * replays

  def _train_iterator(self, start_step: int):
    if self._train_arrays is None:
      self._train_arrays = self.task.arrays("train")
    dataset = distributed_dataset(
        self.strategy, self._train_arrays, self.global_batch_size, shuffle=True,
        seed=self.seed, start_step=start_step,
        repeats_per_batch=self.method.batch_replays,
        augment_fn=getattr(self.task, "augment_batch", None))
    return iter(dataset)

  def _eval_iterator(self):
    # Tokenize the evaluation split once; every evaluation reuses it.
    if self._eval_arrays is None:
      self._eval_arrays = self.task.arrays("eval")
    arrays = self._eval_arrays
    n = len(arrays[next(iter(arrays))])
    num_steps = -(-n // self.eval_batch_size)
    dataset = distributed_dataset(self.strategy, arrays, self.eval_batch_size,
                                  shuffle=False)
    return iter(dataset), num_steps


def _numbered(variables) -> tf.train.Checkpoint:
  """A checkpoint node for a list of variables (seed states, method buffers)."""
  return tf.train.Checkpoint(**{f"v{i}": v for i, v in enumerate(variables)})


def eval_record_path(model_dir: str, split: str) -> str:
  """Where the evaluation of `split` is recorded: `eval_results_<split>.json`."""
  return os.path.join(model_dir, f"eval_results_{split}.json")


def write_eval_records(model_dir: str, task, step: int, results: dict) -> None:
  """Machine-readable records of the final evaluation, for tables and sweeps.

  Every evaluation writes `eval_results_<split>.json`, the split named by the
  task (`dev` for CLUE's dev.json, `test` for images and reviews), so
  evaluating another file (`--mode=evaluate` with `ClueDataset.eval_file`)
  adds a record beside the others. Training (`train_and_evaluate`) also
  writes `eval_results.json`, the run's own record, which nothing else
  overwrites.
  """
  split = getattr(task, "eval_split", "eval")
  record = {"step": step, "split": split,
            **{k: float(v) for k, v in results["eval"].items()}}
  if "train_seconds" in results:
    record["train_seconds"] = results["train_seconds"]
  paths = [eval_record_path(model_dir, split)]
  if "train" in results:
    paths.append(os.path.join(model_dir, "eval_results.json"))
  for path in paths:
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(record, f, indent=1)


def run(mode: str, model_dir: str, strategy: tf.distribute.Strategy,
        print_fn=None) -> dict:
  """Runs `mode` of the gin-configured `Experiment` in `model_dir`."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; expected one of {MODES}.")
  print_fn = print_fn or functools.partial(print, flush=True)
  experiment = Experiment()  # pylint: disable=no-value-for-parameter
  controller = experiment.build(model_dir, strategy, print_fn=print_fn)
  results = {}
  try:
    if controller.is_chief:
      with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
      controller.write_text("train", "gin/operative_config",
                            gin.markdown(gin.operative_config_str()))
    if mode in ("train", "train_and_evaluate"):
      start = time.time()
      results["train"] = controller.train()
      results["train_seconds"] = time.time() - start
      if controller.is_chief and hasattr(experiment.task, "finish_training"):
        # E.g. pretraining writes its keras-hub preset directory.
        results["finished"] = experiment.task.finish_training(experiment.model, model_dir)
        print_fn(f"Wrote {results['finished']}")
    if mode == "train_and_evaluate":
      results["eval"] = controller.evaluate()
    if mode in ("evaluate", "export"):
      if not tf.train.latest_checkpoint(model_dir):
        raise FileNotFoundError(f"No checkpoint in {model_dir}: train first "
                                "(--mode=train) or pass the right --model_dir.")
      controller.restore()
    if mode == "evaluate":
      results["eval"] = controller.evaluate()
    if "eval" in results and controller.is_chief:
      write_eval_records(model_dir, experiment.task, controller.step, results)
    if mode == "export":
      path = experiment.task.export(experiment.model, os.path.join(model_dir, "export"))
      print_fn(f"Exported {path}")
      results["export"] = path
  finally:
    controller.close()
  results["experiment"] = experiment
  return results
