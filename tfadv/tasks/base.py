"""The `Task` contract: what an `Experiment` needs to know about what is learned.

A task owns the data (as arrays by split), the model, and how a batch turns
into model inputs and labels; the method (how to train) and the trainer
(where, how fast) know nothing of it. To add a task, subclass `Task`,
implement the five abstract members, override the optional ones that differ
from their defaults, and name it in a gin file
(`Experiment.task = @MyTask()`).

Required:
  prepare(model_dir)     make or load what the model needs beside its weights
                         (label map, vocabulary) in the model dir;
  build_model()          a Keras model returning logits (built under the
                         strategy's scope by the experiment);
  arrays(split)          {name: array} of "train", "eval" and, when
                         `splits` has it, "validation";
  split_batch(batch)     (model inputs, labels) of a batch of those arrays;
  export(model, dir)     write the trained model for serving; returns a path.

Optional (defaults here):
  dataset                the `tfadv.data.base.Dataset` read, or None;
  splits                 ("train", "eval"), plus "validation" when the data
                         has a validation split (then the experiment keeps
                         the checkpoint best on validation);
  eval_split             name of the "eval" split in records ("dev", "test");
  accuracy_name          the progress line's and records' accuracy key;
  input_shape(batch)     per-replica input shape, for methods with buffers;
  source(split)          where the pipeline reads the split's rows: an
                         `ArraySource` of `arrays(split)`, or, when the
                         experiment sets `record_store`, that store's
                         `RecordSource` (a task need not change to read
                         from disk: the store holds what `arrays` gives);
  num_examples(split)    examples in a split (the size of a method's
                         per-example memory: the pipeline's `example_index`
                         of a training batch is a row of `source("train")`);
  per_example_loss       (labels, logits) -> per-example loss (cross-entropy);
  count_correct          (labels, logits, weights) -> (correct, total);
  augment_batch          (batch, seed) -> batch, or None for no augmentation;
  preprocess_eval        batch -> batch for evaluation batches (decoding, a
                         centre crop), or None;
  embedding_layer        the layer an embedding-space evaluation attack
                         perturbs (text tasks), or None;
  finish_training        a hook at the end of training (pretraining writes
                         its preset there).

Example (a complete task):
>>> class Parity(Task):
...   def prepare(self, model_dir): pass
...   def build_model(self):
...     return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
...   def arrays(self, split):
...     x = np.random.RandomState(0).randint(0, 2, (64, 4)).astype("float32")
...     return {"x": x, "y": (x.sum(1) % 2).astype("int32")}
...   def split_batch(self, batch): return batch["x"], batch["y"]
...   def export(self, model, export_dir):
...     model.save(export_dir + "/model.keras"); return export_dir
"""

import abc
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tfadv.data.records import RecordSource
from tfadv.data.sources import ArraySource, ExampleSource


def sparse_cross_entropy(labels, logits):
  """Per-example cross-entropy of integer labels and logits."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def count_correct(labels, logits, weights):
  """Classification: (weighted correct predictions, weighted examples)."""
  hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
                 tf.float32)
  return tf.reduce_sum(hits * weights), tf.reduce_sum(weights)


class Task(abc.ABC):
  """Base class of tasks; see the module docstring for the contract."""

  accuracy_name = "accuracy"
  # The `tfadv.data.base.Dataset` the task reads, if any (splits, eval_split
  # and the HParams dashboard's "dataset" come from it).
  dataset = None
  # (batch, seed) -> batch: random augmentation of training batches, or None.
  augment_batch: Optional[Callable] = None
  # batch -> batch: deterministic preprocessing of evaluation batches, or None.
  preprocess_eval: Optional[Callable] = None
  # The embedding layer an embedding-space evaluation attack perturbs, or None.
  embedding_layer: Optional[str] = None
  # A record store (`tfadv.data.records`) to read instead of `arrays`; set
  # by `Experiment.record_store`.
  record_store: Optional[str] = None

  # What decides a store's rows (`store_signature`): the task's and its
  # dataset's settings of these names, where they have them. Paths (and the
  # names derived from them) are left out: a store may be read from a bucket
  # the data never saw.
  SIGNATURE_TASK = ("sequence_length", "preset", "vocabulary_size", "vocabulary_min_count",
                    "image_size", "resize_size", "crop")
  SIGNATURE_DATASET = ("train_file", "eval_file", "fields", "validation_fraction",
                       "validation_seed", "num_folds", "validation_fold", "seed",
                       "num_train", "num_eval", "num_validation", "max_chars")

  def store_signature(self) -> dict:
    """The settings a record store of this task is written with
    (`write_records` saves them; a run on the store checks its own against
    them, `tfadv.data.records.check_signature`)."""
    signature = {}
    for owner, names in ((self, self.SIGNATURE_TASK),
                         (getattr(self, "dataset", None), self.SIGNATURE_DATASET)):
      for name in names:
        value = getattr(owner, name, None) if owner is not None else None
        if value is not None:
          value = list(value) if isinstance(value, tuple) else value
          if name.endswith("_file"):  # a file's name, not where it was read from
            value = os.path.basename(str(value))
          signature[f"{type(owner).__name__}.{name}"] = value
    return json.loads(json.dumps(signature, default=str))

  @abc.abstractmethod
  def prepare(self, model_dir: str) -> None:
    """Creates or loads what the model needs beside its weights, in `model_dir`."""

  @abc.abstractmethod
  def build_model(self) -> keras.Model:
    """The model (returning logits); called under the strategy's scope."""

  @abc.abstractmethod
  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    """Examples of `split` ("train", "validation", "eval") as equally long arrays."""

  @abc.abstractmethod
  def split_batch(self, batch) -> Tuple:
    """(model inputs, labels) of a batch of `arrays`."""

  @abc.abstractmethod
  def export(self, model: keras.Model, export_dir: str) -> str:
    """Writes `model` for use outside tfadv; returns the path written."""

  @property
  def splits(self) -> Tuple[str, ...]:
    return tuple(self.dataset.splits) if self.dataset is not None else ("train", "eval")

  @property
  def eval_split(self) -> str:
    return self.dataset.eval_split if self.dataset is not None else "eval"

  def input_shape(self, per_replica_batch: int) -> Optional[tuple]:
    """One replica's input shape (for methods with per-example buffers), or None."""
    del per_replica_batch
    return None

  def source(self, split: str) -> ExampleSource:
    """The rows of `split` as the pipeline reads them (made once per split)."""
    sources = self.__dict__.setdefault("_sources", {})
    if split not in sources:
      if self.record_store:
        sources[split] = RecordSource(self.record_store, split)
      else:
        sources[split] = self.make_source(split)
    return sources[split]

  def make_source(self, split: str) -> ExampleSource:
    """The in-memory source of `split` (override to read elsewhere, e.g. TFDS)."""
    return ArraySource(self.arrays(split))

  def num_examples(self, split: str) -> int:
    """The number of examples of `split`: rows of `source(split)`."""
    return self.source(split).num_examples

  def per_example_loss(self, labels, logits):
    return sparse_cross_entropy(labels, logits)

  def count_correct(self, labels, logits, weights):
    return count_correct(labels, logits, weights)

  def finish_training(self, model: keras.Model, model_dir: str) -> Optional[str]:
    """Called once after training (chief only); may return a path it wrote."""
    del model, model_dir
    return None


def load_or_save_labels(model_dir: str, make_labels: Callable[[], List[str]],
                        dataset_name: str = "") -> List[str]:
  """The model's class order: `labels.json` in the model dir, written on first use.

  A resumed, evaluated or exported run reads the mapping the model was
  trained with, whatever the data directory says now.
  """
  path = os.path.join(model_dir, "labels.json")
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)["labels"]
  labels = [str(x) for x in make_labels()]
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump({"labels": labels, "dataset": dataset_name}, f,
              ensure_ascii=False, indent=1)
  return labels
