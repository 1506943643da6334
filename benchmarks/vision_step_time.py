"""Step time of plain, FGSM-RS, PGD-7, Free and ATTA-1 training on one CNN, in one process.

    .venv/bin/python benchmarks/vision_step_time.py [--batch 128 --jit]

Every method trains Madry's MNIST CNN (28×28×1) on the same batches through
the same `Trainer`; Free is timed per replay (one optimizer step). Ratios are
to plain training. Physics: an ascent step needs the input gradient but no
weight gradients, about 2/3 of a training step, so PGD-7 ≈ 1 + 7·2/3 ≈ 5.7×,
FGSM-RS ≈ 1.7×, and a Free replay ≈ 1× (its one backward pass also yields the
input gradient). ATTA-1 is FGSM-RS's two passes plus a gather and a scatter
of the batch's rows of its per-example memory (here 8 batches of examples).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from timing import best_step_time, report  # pylint: disable=g-import-not-at-top
from tfadv.data.pipeline import distributed_dataset
from tfadv.experiment import build_trainer
from tfadv.tasks.base import sparse_cross_entropy
from tfadv.methods import ATTATraining, FGSMTraining, FreeTraining, PGDTraining, Plain
from tfadv.models.vision import small_cnn

EPS = 0.1
METHODS = {
    "plain": Plain,
    "fgsm_rs": lambda: FGSMTraining(epsilon=EPS),
    "pgd7": lambda: PGDTraining(epsilon=EPS, step_size=EPS / 4, num_steps=7),
    "free_per_replay": lambda: FreeTraining(epsilon=EPS, replays=8),
    "atta1": lambda: ATTATraining(epsilon=EPS, step_size=EPS / 4, num_steps=1),
}
TARGETS = {"fgsm_rs": 1.75, "pgd7": 6.0, "free_per_replay": 1.05, "atta1": 1.8}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--jit", action="store_true", help="XLA-compile the step")
  parser.add_argument("--profile", action="store_true", help="time the passes alone")
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  n = 8 * args.batch
  arrays = {"image": rng.randint(0, 256, (n, 28, 28, 1)).astype(np.uint8),
            "label": rng.randint(0, 10, n).astype(np.int32)}
  print(f"Madry CNN on 28x28x1, batch {args.batch}, jit_compile={args.jit}, "
        f"{os.cpu_count()} CPUs, TF {tf.__version__}")
  if args.jit:
    from tensorflow.python.framework import config  # pylint: disable=g-import-not-at-top
    config.disable_op_determinism()
  times = {}
  strategy = tf.distribute.get_strategy()
  for name, factory in METHODS.items():
    keras.utils.set_random_seed(0)
    method = factory()
    trainer = build_trainer(
        lambda: small_cnn((28, 28, 1), 10), method, global_batch_size=args.batch,
        strategy=strategy, optimizer_fn=lambda: keras.optimizers.Adam(1e-3),
        input_shape=(args.batch, 28, 28, 1), jit_compile=args.jit, num_examples=n,
        split_batch=lambda b: (tf.cast(b["image"], tf.float32) / 255.0, b["label"]))
    iterator = iter(distributed_dataset(strategy, arrays, args.batch, shuffle=True,
                                        repeats_per_batch=method.batch_replays))
    times[name] = best_step_time(trainer, iterator, args.steps, args.repeats)
    print(report(name, times[name], times["plain"], TARGETS.get(name)), flush=True)
  if args.profile:
    profile(args, arrays, times["plain"])


def profile(args, arrays, plain):
  """The passes the methods are made of, timed alone (ratio to a plain step)."""
  keras.utils.set_random_seed(0)
  model = small_cnn((28, 28, 1), 10)
  x = tf.constant(arrays["image"][:args.batch], tf.float32) / 255.0
  y = tf.constant(arrays["label"][:args.batch])

  def grads(sources, watch_input):
    with tf.GradientTape() as tape:
      if watch_input:
        tape.watch(x)
      loss = tf.reduce_mean(sparse_cross_entropy(y, model(x, training=True)))
    return tape.gradient(loss, sources)

  weights = model.trainable_variables
  passes = {
      "forward": tf.function(lambda: model(x, training=True)),
      "backward to weights (plain)": tf.function(lambda: grads(weights, False)),
      "backward to weights + input (Free)": tf.function(lambda: grads(weights + [x], True)),
      "backward to input only (an ascent)": tf.function(lambda: grads([x], True)),
  }
  print("Profile (forward + the backward named, each alone):")
  for name, fn in passes.items():
    fn()
    start = time.perf_counter()
    for _ in range(args.steps):
      result = fn()
    tf.nest.map_structure(lambda t: t.numpy(), result)
    seconds = (time.perf_counter() - start) / args.steps
    print(f"  {name:38s} {1000 * seconds:8.1f} ms  {seconds / plain:5.2f}x", flush=True)


if __name__ == "__main__":
  main()
