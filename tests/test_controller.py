"""The controller's training-time account, on a fake clock (no wall-clock assertion)."""

import pytest
import tensorflow as tf

from tfadv.controller import Controller


class FakeClock:
  """Time moves only when a step runs: each step costs `seconds_per_step`."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class StepTrainer:
  """The runner's contract (`Trainer`) with no model: a step advances the clock."""

  accuracy_name = "accuracy"

  def __init__(self, clock, seconds_per_step, killed_after=None):
    self.clock, self.seconds_per_step = clock, seconds_per_step
    self.killed_after = killed_after
    self.global_step = tf.Variable(0, dtype=tf.int64)
    self.train_seconds = tf.Variable(0.0, dtype=tf.float64)
    self.stop_requested = tf.Variable(False)

  def train(self, iterator, num_steps):
    del iterator
    self.global_step.assign_add(num_steps)
    self.clock.now += num_steps * self.seconds_per_step
    if self.killed_after is not None and self.global_step.numpy() > self.killed_after:
      raise KeyboardInterrupt  # the process dies before the loop's bookkeeping
    return {"steps": num_steps, "loss": 0.5, "accuracy": 0.5}


def _controller(model_dir, clock, trainer, train_steps):
  checkpoint = tf.train.Checkpoint(global_step=trainer.global_step,
                                   train_seconds=trainer.train_seconds)
  return Controller(trainer, str(model_dir), checkpoint, lambda step: None, None,
                    train_steps=train_steps, examples_per_step=8, steps_per_loop=5,
                    checkpoint_every=10, print_fn=lambda line: None, clock=clock)


def test_training_time_is_summed_over_invocations_and_lost_work_counts_once(tmp_path):
  clock = FakeClock()
  first = StepTrainer(clock, seconds_per_step=2.0, killed_after=10)
  # The first process checkpoints at step 10 (every 10), then dies during
  # steps 11-15: that work is lost with it.
  with pytest.raises(KeyboardInterrupt):
    _controller(tmp_path, clock, first, train_steps=40).train()
  clock.now += 500.0  # the machine is down: not training time
  second = StepTrainer(clock, seconds_per_step=2.0)
  _controller(tmp_path, clock, second, train_steps=40).train()
  assert int(second.global_step.numpy()) == 40
  # 10 checkpointed steps of the first process (20 s) + 30 steps of the second
  # (60 s); the 5 lost steps (10 s) and the downtime are not counted.
  assert float(second.train_seconds.numpy()) == 80.0


def test_examples_per_second_come_from_the_clock(tmp_path):
  clock, lines = FakeClock(), []
  trainer = StepTrainer(clock, seconds_per_step=0.5)
  controller = _controller(tmp_path, clock, trainer, train_steps=5)
  controller.print = lines.append
  controller.train()
  assert controller.last_train["examples_per_sec"] == 5 * 8 / 2.5
  assert any("16.0 examples/sec" in line for line in lines), lines
