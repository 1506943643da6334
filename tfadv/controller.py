"""The controller: the outer training loop, checkpoints, summaries and progress.

It calls the runner (`Trainer.train(iterator, n)`) in chunks that end on
logging, checkpoint and evaluation boundaries, so the in-graph loop never
needs to know about any of them.
"""

import functools
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, Optional

import tensorflow as tf

from tfadv.preemption import Preempted, SigtermWatcher
from tfadv.trainer import Trainer


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Controller:
  """Runs training and evaluation for a `Trainer`, with checkpoints and summaries.

  Args:
    trainer: the runner.
    model_dir: where checkpoints (`ckpt-N`), TensorBoard events (`train/`,
      `eval/`) go. Non-chief workers write to a temporary directory instead,
      removed at the end (TensorFlow's multi-worker pattern).
    checkpoint: a `tf.train.Checkpoint` holding everything to resume (model,
      optimizer, global step, method buffers).
    train_iterator_fn: `start_step -> iterator` over training batches.
    eval_iterator_fn: `() -> (iterator, num_steps)` over one evaluation pass.
    validation_iterator_fn: the same over the validation split, or None.
      With one, the `eval_every` evaluations (and one at the end of
      training) are on validation, and the checkpoint with the best
      validation accuracy is kept in `<model_dir>/best/` (its step and
      metrics in `best/best.json`); the evaluation split is left alone.
    train_steps: total steps of the run.
    examples_per_step: global batch size, for examples/sec.
    steps_per_loop: steps per in-graph loop; progress lines are printed and
      train summaries written at these boundaries.
    checkpoint_every: save every this many steps (and at the end).
    eval_every: evaluate every this many steps (0: only at the end).
    max_checkpoints: checkpoints kept.
    is_chief: whether this process writes to `model_dir`.
    learning_rate_fn: `() -> float`, the current learning rate.
    print_fn: where progress lines go.
    clock: seconds now (the training-time account and examples/sec read it).
  """

  def __init__(self, trainer: Trainer, model_dir: str,
               checkpoint: tf.train.Checkpoint, train_iterator_fn: Callable,
               eval_iterator_fn: Optional[Callable], train_steps: int,
               examples_per_step: int, steps_per_loop: int = 50,
               checkpoint_every: int = 500, eval_every: int = 0,
               max_checkpoints: int = 3, is_chief: bool = True,
               learning_rate_fn: Optional[Callable[[], float]] = None,
               print_fn: Callable[[str], None] = functools.partial(print, flush=True),
               validation_iterator_fn: Optional[Callable] = None,
               clock: Callable[[], float] = time.time):
    self.trainer = trainer
    self.clock = clock
    self.model_dir = model_dir
    self.train_iterator_fn = train_iterator_fn
    self.eval_iterator_fn = eval_iterator_fn
    self.train_steps = train_steps
    self.examples_per_step = examples_per_step
    self.steps_per_loop = max(1, steps_per_loop)
    self.checkpoint_every = checkpoint_every
    self.eval_every = eval_every
    self.is_chief = is_chief
    self.learning_rate_fn = learning_rate_fn
    self.print = print_fn
    self._write_dir = model_dir if is_chief else tempfile.mkdtemp(prefix="tfadv_worker_")
    self.checkpoint = checkpoint
    self.manager = tf.train.CheckpointManager(
        checkpoint, self._write_dir, max_to_keep=max_checkpoints,
        step_counter=trainer.global_step, checkpoint_interval=None)
    self.validation_iterator_fn = validation_iterator_fn
    self.best_manager = None
    self.best: Dict = {}
    if validation_iterator_fn is not None:
      self.best_manager = tf.train.CheckpointManager(
          checkpoint, os.path.join(self._write_dir, "best"), max_to_keep=1,
          step_counter=trainer.global_step, checkpoint_interval=None)
      path = os.path.join(model_dir, "best", "best.json")
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
          self.best = json.load(f)
    self._writers = {}
    self.last_eval: Dict[str, float] = {}
    self.last_train: Dict[str, float] = {}

  @property
  def step(self) -> int:
    return int(self.trainer.global_step.numpy())

  def writer(self, name: str) -> tf.summary.SummaryWriter:
    if name not in self._writers:
      self._writers[name] = tf.summary.create_file_writer(
          os.path.join(self._write_dir, name))
    return self._writers[name]

  @property
  def has_validation(self) -> bool:
    return self.validation_iterator_fn is not None

  def restore(self, best: bool = False) -> Optional[str]:
    """Restores the newest checkpoint (`best`: the best on validation); returns its path."""
    directory = os.path.join(self.model_dir, "best") if best else self.model_dir
    latest = tf.train.latest_checkpoint(directory)
    if latest:
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      self.print(f"Restored {latest} at step {self.step}.")
    return latest

  def save(self) -> str:
    path = self.manager.save(checkpoint_number=self.trainer.global_step)
    return path

  def write_summaries(self, name: str, metrics: Dict[str, float], step: int):
    with self.writer(name).as_default(step=step):
      for key, value in metrics.items():
        tf.summary.scalar(key, value)
    self.writer(name).flush()

  def write_text(self, name: str, tag: str, text: str):
    with self.writer(name).as_default(step=self.step):
      tf.summary.text(tag, text)
    self.writer(name).flush()

  def _next_boundary(self, step: int) -> int:
    candidates = [self.train_steps, (step // self.steps_per_loop + 1) * self.steps_per_loop]
    for every in (self.checkpoint_every, self.eval_every):
      if every:
        candidates.append((step // every + 1) * every)
    return min(candidates)

  def train(self) -> Dict[str, float]:
    """Trains from the restored step to `train_steps`.

    On SIGTERM it stops at the next step boundary, saves a checkpoint there
    and raises `Preempted` (see `tfadv.preemption`).
    """
    self.restore()
    step = self.step
    if step >= self.train_steps:
      self.print(f"Already trained {step} of {self.train_steps} steps.")
      if self.has_validation and self.best.get("step", -1) < 0:
        self.validate()
      return self.last_train
    iterator = self.train_iterator_fn(step)
    self.print(f"Training from step {step} to {self.train_steps}.")
    start_time, start_step = self.clock(), step
    # The training time of the checkpointed steps, summed over processes: a
    # run resumed after a kill reports what an uninterrupted run would, less
    # the work lost after its last checkpoint (done again, counted once).
    trained_before = float(self.trainer.train_seconds.numpy())
    accuracy = self.trainer.accuracy_name
    with SigtermWatcher(self.trainer.stop_requested) as watcher:
      while step < self.train_steps:
        num_steps = self._next_boundary(step) - step
        loop_start = self.clock()
        metrics = self.trainer.train(iterator, num_steps)
        elapsed = self.clock() - loop_start
        num_steps = metrics.pop("steps")
        step = self.step
        metrics["examples_per_sec"] = num_steps * self.examples_per_step / max(elapsed, 1e-9)
        if self.learning_rate_fn is not None:
          metrics["learning_rate"] = self.learning_rate_fn()
        self.last_train = metrics
        self.write_summaries("train", metrics, step)
        rate = (self.clock() - start_time) / max(step - start_step, 1)
        extra = "".join(f" | {k} {v:.4g}" for k, v in metrics.items() if k not in (
            "loss", accuracy, "examples_per_sec", "learning_rate"))
        self.print(f"step {step}/{self.train_steps} | loss {metrics['loss']:.4f} | "
                   f"{accuracy} {metrics[accuracy]:.4f} | lr "
                   f"{metrics.get('learning_rate', float('nan')):.3g}{extra} | "
                   f"{metrics['examples_per_sec']:.1f} examples/sec | ETA "
                   f"{_format_duration(rate * (self.train_steps - step))}")
        self.trainer.train_seconds.assign(trained_before + self.clock() - start_time)
        if watcher.triggered or bool(self.trainer.stop_requested.numpy()):
          path = self.save()
          self.print(f"Preempted (SIGTERM) at step {step}: saved {path}.")
          raise Preempted(step, path)
        if (self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.train_steps:
          self.save()
        periodic = self.eval_every and step % self.eval_every == 0
        if self.has_validation and (periodic or step == self.train_steps):
          self.validate()
        elif periodic and step < self.train_steps:
          self.evaluate()
    return self.last_train

  def validate(self) -> Dict[str, float]:
    """Evaluates on validation; keeps the checkpoint if it is the best so far."""
    iterator, num_steps = self.validation_iterator_fn()
    metrics = self.trainer.evaluate(iterator, num_steps)
    metrics.pop("examples")
    self.write_summaries("validation", metrics, self.step)
    accuracy = self.trainer.accuracy_name
    improved = not self.best or metrics[accuracy] > self.best["metrics"][accuracy]
    if improved:
      self.best = {"step": self.step, "metrics": metrics}
      self.best_manager.save(checkpoint_number=self.trainer.global_step)
      if self.is_chief:
        with tf.io.gfile.GFile(os.path.join(self.model_dir, "best", "best.json"), "w") as f:
          json.dump(self.best, f, indent=1)
    self.print(f"validation at step {self.step} | loss {metrics['loss']:.4f} | "
               f"{accuracy} {metrics[accuracy]:.4f} | best {self.best['metrics'][accuracy]:.4f} "
               f"at step {self.best['step']}{' (new)' if improved else ''}")
    return metrics

  def write_hparams(self, values: Dict) -> None:
    """The run's settings for TensorBoard's HParams dashboard (in the model dir)."""
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
    accuracy = self.trainer.accuracy_name
    metrics = [hp.Metric(accuracy, group="eval", display_name=f"eval {accuracy}")]
    if self.has_validation:
      metrics.append(hp.Metric(accuracy, group="validation",
                               display_name=f"validation {accuracy}"))
    with self.writer(".").as_default(step=self.step):
      hp.hparams_config(hparams=[hp.HParam(k) for k in values], metrics=metrics)
      hp.hparams(values, trial_id=os.path.basename(os.path.normpath(self.model_dir)))
    self.writer(".").flush()

  def evaluate(self) -> Dict[str, float]:
    """One pass over the evaluation data at the current weights."""
    iterator, num_steps = self.eval_iterator_fn()
    start = time.time()
    metrics = self.trainer.evaluate(iterator, num_steps)
    examples = metrics.pop("examples")
    self.last_eval = metrics
    self.write_summaries("eval", metrics, self.step)
    accuracy = self.trainer.accuracy_name
    extra = "".join(f" | {k} {v:.4f}" for k, v in metrics.items()
                    if k not in ("loss", accuracy))
    self.print(f"eval at step {self.step} | loss {metrics['loss']:.4f} | "
               f"{accuracy} {metrics[accuracy]:.4f}{extra} | {int(examples)} "
               f"examples in {time.time() - start:.1f}s")
    return metrics

  def close(self):
    for writer in self._writers.values():
      writer.close()
    if not self.is_chief:
      shutil.rmtree(self._write_dir, ignore_errors=True)
