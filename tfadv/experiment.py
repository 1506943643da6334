"""The gin-configured experiment: task + method + optimizer + trainer + controller."""

import functools
import json
import math
import os
import re
from typing import Callable, Optional

import gin
import keras
import tensorflow as tf
from absl import logging

from tfadv import checks, compat, distribute, errors
from tfadv.controller import Controller
from tfadv.data import records
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods.base import Method
from tfadv.methods.plain import Plain
from tfadv.models.state import random_state_variables
from tfadv.optimization import adamw
from tfadv.tasks.base import Task, count_correct, sparse_cross_entropy
from tfadv.trainer import Trainer

MODES = ("train", "evaluate", "train_and_evaluate", "export")
MIXED_PRECISION = ("float32", "mixed_bfloat16", "mixed_float16")


def build_trainer(model_fn: Callable[[], keras.Model], method: Optional[Method] = None,
                  *, global_batch_size: int, task: Optional[Task] = None,
                  strategy: Optional[tf.distribute.Strategy] = None,
                  optimizer_fn: Optional[Callable[[], keras.optimizers.Optimizer]] = None,
                  input_shape=None, mixed_precision: Optional[str] = None,  # None: as set
                  jit_compile: bool = False, eval_attacks: Optional[dict] = None,
                  eval_jit_compile: Optional[bool] = None,
                  split_batch: Optional[Callable] = None,
                  per_example_loss: Optional[Callable] = None,
                  sparse_reduce: bool = False,
                  num_examples: Optional[int] = None,
                  adversarial_start_step: int = 0, epsilon_ramp_steps: int = 0,
                  seed: int = 0) -> Trainer:
  """Model, optimizer and method built under `strategy`'s scope, in a `Trainer`.

  The one place a trainer is assembled: `Experiment`, the tests and the
  benchmarks all call it. `task` supplies the batch split, loss, accuracy
  and input shape (each overridable by the keyword of the same name);
  without a task, `split_batch` is required and the loss is cross-entropy.
  A method with per-example state (`uses_example_ids`) is built with
  `num_examples` (default: the task's training split size). `seed` is the
  run's: a method whose own seed is unbound draws from it (`Method.seed_with`).

  Example:
  >>> trainer = build_trainer(lambda: keras_hub.models.BertTextClassifier(
  ...     backbone, num_classes=15), EmbeddingFGM(epsilon=0.5),
  ...     global_batch_size=32, split_batch=lambda b: (features(b), b["label"]))
  >>> metrics = trainer.train(iterator, num_steps=10)
  """
  strategy = strategy or tf.distribute.get_strategy()
  method = method if method is not None else Plain()
  method.seed_with(seed)
  if method.keeps_input_perturbations and getattr(task, "augment", False):
    raise errors.SettingError(
        f"{type(method).__name__} keeps each training image's perturbation from its "
        "last epoch, which a random crop or flip would misalign (ATTA's reference "
        "undoes the augmentation first): set ImageClassificationTask.augment = False, "
        "or train with PGDTraining or FreeTraining.")
  per_replica_batch = global_batch_size // strategy.num_replicas_in_sync
  if task is not None:
    split_batch = split_batch or task.split_batch
    per_example_loss = per_example_loss or task.per_example_loss
    if input_shape is None:
      input_shape = task.input_shape(per_replica_batch)
    if num_examples is None and method.uses_example_ids:
      num_examples = task.num_examples("train")
  if split_batch is None:
    raise ValueError("build_trainer: pass task= or split_batch=.")
  if mixed_precision is not None:  # None: the current global policy
    keras.mixed_precision.set_global_policy(mixed_precision)
  with strategy.scope():
    model = model_fn()
    optimizer = (optimizer_fn or (lambda: keras.optimizers.Adam(1e-3)))()
    if mixed_precision == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    if method.uses_example_ids:
      if num_examples is None:
        raise ValueError(f"build_trainer: {type(method).__name__} keeps per-example "
                         "state; pass task= or num_examples=.")
      method.build(model, input_shape=input_shape, num_examples=num_examples)
    else:
      method.build(model, input_shape=input_shape)
  return Trainer(
      strategy, model, optimizer, method, split_batch=split_batch,
      per_example_loss=per_example_loss or sparse_cross_entropy,
      global_batch_size=global_batch_size, jit_compile=jit_compile,
      eval_jit_compile=eval_jit_compile,
      eval_attacks=eval_attacks, sparse_reduce=sparse_reduce,
      adversarial_start_step=adversarial_start_step, epsilon_ramp_steps=epsilon_ramp_steps,
      count_correct=task.count_correct if task is not None else count_correct,
      accuracy_name=task.accuracy_name if task is not None else "accuracy")


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
    eval_jit_compile: compile the evaluation step with XLA (None: as
      `jit_compile`; `Trainer`).
    adversarial_start_step: plain training before this step, the method
      after (a warm-up; `Trainer`). 0: the method from the first step.
    epsilon_ramp_steps: the method's ε rises linearly over this many steps
      from `adversarial_start_step` (`Trainer`); 0: full ε at once.
    steps_per_loop: steps per in-graph loop and progress line.
    checkpoint_every: checkpoint interval in steps.
    eval_every: evaluation interval in steps (0: at the end only).
    max_checkpoints: checkpoints kept in the model dir.
    optimizer_fn: `(total_steps) -> optimizer`, e.g. `@adamw` (default) or
      `@sgd_momentum`.
    eval_attacks: `{name: attack}`: evaluation also reports
      `accuracy_<name>` under each attack (robust accuracy), and with two or
      more the per-example worst case: `tfadv.attacks.InputAttack`/`APGD`
      for image tasks, `EmbeddingOutputAttack` and
      `tfadv.attacks.CharSubstitutionAttack` for text tasks.
    attack_examples: after evaluating, write N of the evaluated split's
      examples, evenly spaced over it, under each attack that can show them
      (the character substitutions) to `attack_examples_<split>_<attack>.jsonl`.
    eval_tag: a name for this evaluation, added to its records
      (`eval_results_<split>_<tag>.json`, `attack_examples_<split>_<tag>_<attack>.jsonl`):
      a later `--mode=evaluate` of a trained model under other settings
      (e.g. the character attacks of `methods_table --attack_budgets`) is kept
      beside the training's own `eval_results_<split>.json`, not written over it.
    record_store: read the task's examples from this record store
      (`tfadv.data.records`, written by `python -m tfadv.tools.write_records`
      from the same config) instead of holding them in memory: rows are read
      by index as steps need them, in the same order (same weights, exact
      resume). None: the task's arrays in memory.
    mixed_precision: a Keras dtype policy for the model: "mixed_bfloat16"
      (TPU) or "mixed_float16" (GPU): layers compute in 16 bits; variables,
      losses, gradients, perturbations (FGM's Δ, Free's δ, PGD iterates) and
      the optimizer stay float32. With "mixed_float16" the optimizer is
      wrapped in `keras.optimizers.LossScaleOptimizer` (dynamic loss scale,
      steps with non-finite gradients skipped), and every method
      differentiates the scaled loss. None: float32 throughout.
  """

  def __init__(self, task: Task = gin.REQUIRED, method: Optional[Method] = None,
               train_steps: int = 1000, global_batch_size: int = 32,
               eval_batch_size: Optional[int] = None, seed: int = 0,
               deterministic: bool = True, jit_compile: bool = False,
               eval_jit_compile: Optional[bool] = None,
               adversarial_start_step: int = 0, epsilon_ramp_steps: int = 0,
               steps_per_loop: int = 50, checkpoint_every: int = 500,
               eval_every: int = 0, max_checkpoints: int = 3,
               train_epochs: Optional[float] = None, optimizer_fn=adamw,
               eval_attacks: Optional[dict] = None,
               mixed_precision: Optional[str] = None, attack_examples: int = 0,
               eval_tag: str = "", record_store: Optional[str] = None):
    checks.check("Experiment", train_steps=(train_steps, checks.AT_LEAST_ONE),
                 global_batch_size=(global_batch_size, checks.AT_LEAST_ONE),
                 eval_batch_size=(eval_batch_size, checks.AT_LEAST_ONE),
                 adversarial_start_step=(adversarial_start_step, checks.NON_NEGATIVE_INT),
                 epsilon_ramp_steps=(epsilon_ramp_steps, checks.NON_NEGATIVE_INT),
                 steps_per_loop=(steps_per_loop, checks.AT_LEAST_ONE),
                 checkpoint_every=(checkpoint_every, checks.NON_NEGATIVE_INT),
                 eval_every=(eval_every, checks.NON_NEGATIVE_INT),
                 max_checkpoints=(max_checkpoints, checks.AT_LEAST_ONE),
                 train_epochs=(train_epochs, checks.POSITIVE),
                 mixed_precision=(mixed_precision, checks.one_of(MIXED_PRECISION)),
                 attack_examples=(attack_examples, checks.NON_NEGATIVE_INT))
    self.task = task
    self.record_store = record_store
    self.method = method if method is not None else Plain()
    self.train_steps = train_steps
    self.train_epochs = train_epochs
    self.optimizer_fn = optimizer_fn
    self.eval_attacks = dict(eval_attacks or {})
    self.attack_examples = int(attack_examples)
    if eval_tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", eval_tag):
      raise errors.SettingError(f"Experiment.eval_tag = {eval_tag!r}: use letters, "
                                "digits, '.' and '-' (it names files).")
    self.eval_tag = eval_tag
    self.mixed_precision = mixed_precision
    self.global_batch_size = global_batch_size
    self.eval_batch_size = eval_batch_size or global_batch_size
    self.seed = seed
    self.deterministic = deterministic
    self.jit_compile = jit_compile
    self.eval_jit_compile = eval_jit_compile
    self.adversarial_start_step = adversarial_start_step
    self.epsilon_ramp_steps = epsilon_ramp_steps
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
    if not isinstance(self.task, Task):
      raise TypeError(f"Experiment.task is a {type(self.task).__name__}; a task "
                      "subclasses tfadv.tasks.Task (tfadv/tasks/base.py).")
    keras.utils.set_random_seed(self.seed)
    if self.deterministic and not self.jit_compile:
      tf.config.experimental.enable_op_determinism()
    elif self.jit_compile and compat.op_determinism_enabled():
      # TF refuses some XLA kernels under op determinism (MaxPool's gradient);
      # XLA's own CPU/TPU kernels do not depend on thread timing.
      logging.info("jit_compile=True: op determinism left to XLA.")
      compat.disable_op_determinism()
    self.strategy = strategy
    print_fn = print_fn or functools.partial(print, flush=True)
    if self.record_store:
      records.check_signature(self.record_store, self.task.store_signature())
      self.task.record_store = self.record_store
      records.copy_prepared(self.record_store, model_dir)
    self.task.prepare(model_dir)
    self._check_input_runs(strategy)
    for attack in self.eval_attacks.values():  # e.g. tables of the task's vocabulary
      if hasattr(attack, "prepare"):
        attack.prepare(self.task, model_dir)
    if hasattr(self.method, "prepare"):  # a training attack's tables (character AT)
      self.method.prepare(self.task, model_dir)
    if self.train_epochs is not None:
      self.train_steps = self._steps_for_epochs()
    self.trainer = build_trainer(
        self.task.build_model, self.method, global_batch_size=self.global_batch_size,
        task=self.task, strategy=strategy,
        optimizer_fn=lambda: self.optimizer_fn(total_steps=self.train_steps),
        mixed_precision=self.mixed_precision or "float32", jit_compile=self.jit_compile,
        eval_jit_compile=self.eval_jit_compile,
        adversarial_start_step=self.adversarial_start_step,
        epsilon_ramp_steps=self.epsilon_ramp_steps,
        eval_attacks=self.eval_attacks, seed=self.seed)
    self.model, self.optimizer = self.trainer.model, self.trainer.optimizer
    checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                     global_step=self.trainer.global_step,
                                     train_seconds=self.trainer.train_seconds,
                                     random_state=_numbered(random_state_variables(self.model)),
                                     method=_numbered(self.method.variables))
    validation = "validation" in self.task.splits
    self.controller = Controller(
        self.trainer, model_dir, checkpoint,
        train_iterator_fn=self._train_iterator,
        eval_iterator_fn=functools.partial(self._eval_iterator, "eval"),
        validation_iterator_fn=(functools.partial(self._eval_iterator, "validation")
                                if validation else None),
        train_steps=self.train_steps, examples_per_step=self.global_batch_size,
        steps_per_loop=self.steps_per_loop, checkpoint_every=self.checkpoint_every,
        eval_every=self.eval_every, max_checkpoints=self.max_checkpoints,
        is_chief=distribute.is_chief(strategy),
        learning_rate_fn=lambda: float(self.optimizer.learning_rate),
        print_fn=print_fn)
    return self.controller

  def run(self, mode: str, model_dir: str, strategy: tf.distribute.Strategy,
          print_fn=None) -> dict:
    """Runs `mode` in `model_dir`.

    Returns `{"train": last training metrics, "train_seconds": ...,
    "eval": evaluation metrics, "best": {"step", validation metrics} when the
    task has a validation split, "finished"/"export": paths written}`.

    With a validation split, training evaluates on it every `eval_every`
    steps and at the end, and keeps the best checkpoint (highest validation
    accuracy; the earliest on ties) in `<model_dir>/best/`; the reported
    evaluation ("eval", e.g. CLUE's dev set) and the export use that
    checkpoint, so nothing reported was looked at to choose it.
    """
    if mode not in MODES:
      raise ValueError(f"--mode={mode!r}; expected one of {MODES}.")
    print_fn = print_fn or functools.partial(print, flush=True)
    controller = self.build(model_dir, strategy, print_fn=print_fn)
    results = {}
    try:
      if controller.is_chief:
        # The training's config stays the model's record: a later evaluation
        # or export writes its own beside it.
        training = mode in ("train", "train_and_evaluate")
        name = "operative_config" if training else f"operative_config_{mode}"
        if mode == "evaluate":
          name += f"_{record_name(self.task.eval_split, self.eval_tag)}"
        with tf.io.gfile.GFile(os.path.join(model_dir, f"{name}.gin"), "w") as f:
          f.write(gin.operative_config_str())
        if training:
          controller.write_text("train", "gin/operative_config",
                                gin.markdown(gin.operative_config_str()))
        controller.write_hparams(self.hparams())
      if mode in ("train", "train_and_evaluate"):
        results["train"] = controller.train()
        # Summed over every process that trained this model dir (resumes too).
        results["train_seconds"] = float(self.trainer.train_seconds.numpy())
        if controller.is_chief and controller.has_validation and controller.best:
          # The validation record a selection reads (`--mode=train` suffices).
          write_eval_records(model_dir, self.task, controller.best["step"],
                             dict(results, eval=controller.best["metrics"]),
                             split="validation")
        if controller.is_chief:
          finished = self.task.finish_training(self.model, model_dir)
          if finished:  # e.g. pretraining's keras-hub preset directory
            results["finished"] = finished
            print_fn(f"Wrote {finished}")
      if mode in ("evaluate", "export") or (
          mode == "train_and_evaluate" and controller.has_validation):
        # The best checkpoint on validation, else (a run without one) the newest.
        restored = controller.has_validation and controller.restore(best=True)
        if not (restored or controller.restore()):
          raise FileNotFoundError(f"No checkpoint in {model_dir}: train first "
                                  "(--mode=train) or pass the right --model_dir.")
      if controller.has_validation and controller.best:
        results["best"] = dict(controller.best)
      if mode in ("evaluate", "train_and_evaluate"):
        results["eval"] = controller.evaluate()
      if "eval" in results and controller.is_chief:
        write_eval_records(model_dir, self.task, controller.step, results, self.eval_tag)
        if self.attack_examples:
          self._write_attack_examples(model_dir, print_fn)
      if mode == "export":
        path = self.task.export(self.model, os.path.join(model_dir, "export"))
        print_fn(f"Exported {path}")
        results["export"] = path
    finally:
      controller.close()
    results["accuracy_name"] = self.trainer.accuracy_name
    return results

  def _check_input_runs(self, strategy) -> None:
    """A source read by Python (an ArrayRecord store, TFDS random access)
    cannot feed input pipelines that run without Python (a TPU pod slice):
    one line naming the fix, before anything is written."""
    if not distribute.input_runs_without_python(strategy):
      return
    for split in self.task.splits:
      source = self.task.source(split)
      if source.reads_in_python:
        raise errors.SettingError(
            f"{type(source).__name__} reads {split} rows in Python, but on a TPU pod "
            "slice each host's input pipeline runs without Python (TensorFlow's "
            "single-client model): write a store with `python -m tfadv.tools."
            "write_records --layout=fixed` and set Experiment.record_store, or run on "
            "a single-host slice (v4-8).")

  def hparams(self) -> dict:
    """The run's method and its settings, for TensorBoard's HParams dashboard."""
    values = {"method": self.method.name,
              "task": type(self.task).__name__, "seed": self.seed,
              "train_steps": self.train_steps,
              "adversarial_start_step": self.adversarial_start_step,
              "epsilon_ramp_steps": self.epsilon_ramp_steps,
              "global_batch_size": self.global_batch_size}
    if self.task.dataset is not None:
      values["dataset"] = self.task.dataset.name
    for key, value in self.method.get_config().items():
      if isinstance(value, (bool, int, float, str)):
        values[f"method.{key}"] = value
    return values

  def _steps_for_epochs(self) -> int:
    replays = self.method.batch_replays
    n = self.task.num_examples("train")
    batches = math.ceil(self.train_epochs / replays * n / self.global_batch_size)
    return batches * replays

  def _train_iterator(self, start_step: int):
    dataset = distributed_dataset(
        self.strategy, self.task.source("train"), self.global_batch_size, shuffle=True,
        seed=self.seed, start_step=start_step,
        repeats_per_batch=self.method.batch_replays,
        augment_fn=self.task.augment_batch)
    return iter(dataset)

  def _write_attack_examples(self, model_dir: str, print_fn) -> None:
    """`attack_examples_<split>_<attack>.jsonl`: `attack_examples` examples
    of the evaluated split, evenly spaced, under each attack that can show them."""
    split = record_name(self.task.eval_split, self.eval_tag)
    # Spread over the split: files grouped by label (CLUE's dev) show every class.
    head = self.task.source("eval").spread(self.attack_examples)
    for name, attack in self.eval_attacks.items():
      if not hasattr(attack, "examples"):
        continue
      rows = attack.examples(self.model, self.task, head,
                             self.attack_examples, self.eval_batch_size)
      path = os.path.join(model_dir, f"attack_examples_{split}_{name}.jsonl")
      with tf.io.gfile.GFile(path, "w") as f:  # one JSON object a line, UTF-8
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
      print_fn(f"Wrote {len(rows)} attacked examples to {path}")

  def _eval_iterator(self, split: str):
    # The task makes each split's source once (tokenized once); every
    # evaluation reuses it.
    source = self.task.source(split)
    num_steps = -(-source.num_examples // self.eval_batch_size)
    dataset = distributed_dataset(self.strategy, source, self.eval_batch_size,
                                  shuffle=False, eval_fn=self.task.preprocess_eval)
    return iter(dataset), num_steps


def _numbered(variables) -> tf.train.Checkpoint:
  """A checkpoint node for a list of variables (seed states, method buffers)."""
  return tf.train.Checkpoint(**{f"v{i}": v for i, v in enumerate(variables)})


def record_name(split: str, tag: str = "") -> str:
  """The name of an evaluation's records: the split, then its `eval_tag` if any."""
  return f"{split}_{tag}" if tag else split


def eval_record_path(model_dir: str, split: str, tag: str = "") -> str:
  """Where the evaluation of `split` is recorded: `eval_results_<split>[_<tag>].json`."""
  return os.path.join(model_dir, f"eval_results_{record_name(split, tag)}.json")


def write_eval_records(model_dir: str, task, step: int, results: dict,
                       tag: str = "", split: str = "") -> None:
  """Machine-readable records of the final evaluation, for tables and sweeps.

  Every evaluation writes `eval_results_<split>.json`, the split named by the
  task (`dev` for CLUE's dev.json, `test` for images and reviews), so
  evaluating another file (`--mode=evaluate` with `ClueDataset.eval_file`)
  adds a record beside the others. Training (`train_and_evaluate`) also
  writes `eval_results.json`, the run's own record, which nothing else
  overwrites; it also keeps the last training loop's metrics as
  `train_<name>` (e.g. `train_stuck`, Free's and ATTA's stuck share). A
  `tag` (`Experiment.eval_tag`) names the split's record
  `eval_results_<split>_<tag>.json` and is kept in it. Training with a
  validation split also writes `eval_results_validation.json` (`split`
  "validation"): the best checkpoint's validation metrics, its step and the
  training time, what a selection on validation reads.
  """
  split = split or task.eval_split
  record = {"step": step, "split": split, **({"tag": tag} if tag else {}),
            **{k: float(v) for k, v in results["eval"].items()}}
  for key in ("train_seconds", "best"):
    if key in results:
      record[key] = results[key]
  for key, value in results.get("train", {}).items():
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
      record[f"train_{key}"] = float(value)
  paths = [eval_record_path(model_dir, split, tag)]
  if "train" in results and split == task.eval_split:
    paths.append(os.path.join(model_dir, "eval_results.json"))
  for path in paths:
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(record, f, indent=1)


def run(mode: str, model_dir: str, strategy: tf.distribute.Strategy,
        print_fn=None) -> dict:
  """Runs `mode` of the gin-configured `Experiment` in `model_dir`; returns its results."""
  return Experiment().run(mode, model_dir, strategy, print_fn=print_fn)  # pylint: disable=no-value-for-parameter
