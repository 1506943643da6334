"""Builds small experiments in-process from gin bindings."""

import os

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
