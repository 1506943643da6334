"""Builds small experiments in-process from gin bindings."""

import gzip
import os
import struct

import gin
import keras
import numpy as np

from tfadv import experiment as experiment_lib
from tfadv.main import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = [
    "bert_classifier.num_layers = 1",
    "bert_classifier.num_heads = 2",
    "bert_classifier.hidden_dim = 32",
    "bert_classifier.intermediate_dim = 64",
    "TextClassificationTask.sequence_length = 32",
    "TextClassificationTask.vocabulary_size = 3000",
]


def configure(bindings, gin_files=()):
  gin.clear_config()
  parse_config([os.path.join(REPO, f) for f in gin_files], list(bindings))


def tnews_bindings(fewclue_dir, **experiment):
  lines = TINY_MODEL + [
      "Experiment.task = @TextClassificationTask()",
      "TextClassificationTask.dataset = @ClueDataset()",
      f"ClueDataset.data_dir = '{fewclue_dir}/tnews'",
      "adamw.learning_rate = 2e-3",
  ]
  defaults = dict(train_steps=20, global_batch_size=16, steps_per_loop=10,
                  checkpoint_every=10, seed=1)
  defaults.update(experiment)
  lines += [f"Experiment.{k} = {v!r}" for k, v in defaults.items()]
  return lines


def run(mode, model_dir, strategy, bindings, gin_files=()):
  configure(bindings, gin_files)
  lines = []
  results = experiment_lib.run(mode, str(model_dir), strategy, print_fn=lines.append)
  results["lines"] = lines
  return results


def weights(model):
  return [keras.ops.convert_to_numpy(v) for v in model.variables]


def write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_tiny_fashion_idx(directory, num_train=96, num_test=40):
  """Fashion-MNIST-shaped IDX files of a learnable toy problem: the class
  decides which rows of the image are bright."""
  rng = np.random.RandomState(0)
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", num_train), ("t10k", num_test)):
    labels = rng.randint(0, 10, n)
    images = rng.randint(0, 60, (n, 28, 28))
    for i, label in enumerate(labels):
      images[i, 2 * label:2 * label + 3] += 180
    write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
  return str(directory)


def tiny_fashion_bindings(idx_dir):
  """Bindings over configs/fashion_mnist_*.gin for a CNN small enough for tests."""
  return [f"ImageDataset.data_dir = '{idx_dir}'", "ImageDataset.source = 'idx'",
          "small_cnn.filters = (4, 8)", "small_cnn.dense_units = 16",
          "Experiment.global_batch_size = 16", "Experiment.eval_batch_size = 20",
          "Experiment.train_epochs = 8", "Experiment.steps_per_loop = 8",
          "Experiment.checkpoint_every = 16"]
