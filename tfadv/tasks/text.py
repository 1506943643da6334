"""Text classification with a keras-hub BERT classifier."""

import json
import os
from typing import Dict, List, Optional

import gin
import keras
import keras_hub
import numpy as np
import tensorflow as tf
from absl import logging

from tfadv.data import vocab as vocab_lib
from tfadv.models.bert import bert_classifier

FEATURES = ("token_ids", "segment_ids", "padding_mask")
LABELS = "label"


@gin.configurable
class TextClassificationTask:
  """Tokenized text classification for a dataset with `examples(split)`.

  The task owns what a trained model must carry with it: the label mapping
  (`labels.json`) and, without a preset, the character vocabulary built from
  the training split (`vocab.txt`). Both are written to the model directory
  on first use and read back on resume, so a resumed or evaluated run
  tokenizes exactly as the run that trained the model.

  Args:
    dataset: a `ClueDataset`, `ProductReviews` or anything with
      `label_names()` and `examples("train" | "eval")`.
    sequence_length: tokens per example, `[CLS]` and `[SEP]` included.
    preset: keras-hub preset name or local directory; its tokenizer and
      weights replace the character vocabulary and random initialisation.
    vocabulary_size: upper bound for the built character vocabulary.
    vocabulary_min_count: characters rarer than this map to `[UNK]`.

  Example:
  >>> task = TextClassificationTask(ProductReviews(num_train=500, num_eval=100))
  >>> task.prepare("/tmp/run")
  >>> model = task.build_model()
  >>> arrays = task.arrays("train")  # token_ids, segment_ids, ..., label
  """

  def __init__(self, dataset=gin.REQUIRED, sequence_length: int = 128,
               preset: Optional[str] = None, vocabulary_size: int = 8000,
               vocabulary_min_count: int = 2):
    self.dataset = dataset
    self.sequence_length = sequence_length
    self.preset = preset
    self.vocabulary_size = vocabulary_size
    self.vocabulary_min_count = vocabulary_min_count
    self.label_names: List[str] = []
    self.preprocessor = None

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  @property
  def eval_split(self) -> str:
    return getattr(self.dataset, "eval_split", "eval")

  def prepare(self, model_dir: str) -> None:
    """Loads or creates the label mapping and tokenizer for `model_dir`."""
    tf.io.gfile.makedirs(model_dir)
    labels_path = os.path.join(model_dir, "labels.json")
    if tf.io.gfile.exists(labels_path):
      with tf.io.gfile.GFile(labels_path) as f:
        self.label_names = json.load(f)["labels"]
    else:
      self.label_names = [str(x) for x in self.dataset.label_names()]
      with tf.io.gfile.GFile(labels_path, "w") as f:
        json.dump({"labels": self.label_names,
                   "dataset": getattr(self.dataset, "name", "")}, f,
                  ensure_ascii=False, indent=1)
    if self.preset:
      self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
          self.preset, sequence_length=self.sequence_length)
      return
    vocab_path = os.path.join(model_dir, "vocab.txt")
    if tf.io.gfile.exists(vocab_path):
      vocabulary = vocab_lib.load_vocabulary(vocab_path)
    else:
      texts, _ = self.dataset.examples("train")
      vocabulary = vocab_lib.build_char_vocabulary(
          texts, self.vocabulary_size, self.vocabulary_min_count)
      vocab_lib.save_vocabulary(vocabulary, vocab_path)
      logging.info("Built a %d-token character vocabulary from %d training "
                   "texts: %s", len(vocabulary), len(texts), vocab_path)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=self.sequence_length)

  def input_shape(self, per_replica_batch: int):
    """(batch, length) of one replica's token inputs (FreeLB's buffer uses it)."""
    return (per_replica_batch, self.sequence_length)

  def build_model(self) -> keras.Model:
    return bert_classifier(
        num_classes=self.num_classes,
        vocabulary_size=self.preprocessor.tokenizer.vocabulary_size(),
        sequence_length=self.sequence_length, preprocessor=self.preprocessor,
        preset=self.preset)

  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    """Tokenized features and class indices of `split` ("train" or "eval")."""
    texts, raw_labels = self.dataset.examples(split)
    index = {name: i for i, name in enumerate(self.label_names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
      raise ValueError(
          f"The {split} split of {getattr(self.dataset, 'name', 'the dataset')} "
          f"has labels {unknown[:10]} that are not among the model's "
          f"{len(index)} classes {self.label_names[:20]}.")
    out = {k: [] for k in FEATURES}
    chunk = 2048
    for start in range(0, len(texts), chunk):
      batch = self.preprocessor(tf.constant(texts[start:start + chunk]))
      for k in FEATURES:
        out[k].append(keras.ops.convert_to_numpy(batch[k]))
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays[LABELS] = np.asarray([index[label] for label in raw_labels], np.int32)
    return arrays

  @staticmethod
  def split_batch(batch):
    """(model inputs, class indices) of a batch from `arrays`."""
    return {k: batch[k] for k in FEATURES}, batch[LABELS]

  def export(self, model: keras.Model, export_dir: str) -> str:
    """Saves `model` with its preprocessor: a `.keras` file taking raw text."""
    tf.io.gfile.makedirs(export_dir)
    path = os.path.join(export_dir, "model.keras")
    model.save(path)
    with tf.io.gfile.GFile(os.path.join(export_dir, "labels.json"), "w") as f:
      json.dump({"labels": self.label_names}, f, ensure_ascii=False, indent=1)
    return path
