"""Text classification with a keras-hub BERT classifier."""

import json
import os
from typing import Dict, List, Optional

import gin
import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfadv import checks
from tfadv.data import vocab as vocab_lib
from tfadv.errors import InputDataError, MissingInputError
from tfadv.models.bert import bert_classifier, check_checkpoint_dir, checkpoint_kind
from tfadv.tasks.base import Task, load_or_save_labels

# The preset `make pretrain` writes, which every CLUE config fine-tunes from.
PRETRAINED_PRESET = "runs/pretrain_mlm_zh/preset"

FEATURES = ("token_ids", "segment_ids", "padding_mask")
LABELS = "label"


def flatten_texts(texts) -> list:
  """Every text of a list of texts or sentence pairs (for a vocabulary)."""
  return [t for item in texts for t in (item if isinstance(item, tuple) else (item,))]


def preprocessor_input(texts):
  """A keras-hub preprocessor's `x` for texts, or for pairs `(a, b)`: a
  tuple of two string tensors, which it packs as `[CLS] a [SEP] b [SEP]`
  with segment ids 0 then 1."""
  if texts and isinstance(texts[0], tuple):
    return (tf.constant([a for a, _ in texts]), tf.constant([b for _, b in texts]))
  return tf.constant(texts)


@gin.configurable
class TextClassificationTask(Task):
  """Tokenized text classification for a dataset with `examples(split)`.

  The task owns what a trained model must carry with it: the label mapping
  (`labels.json`) and, without a preset, the character vocabulary built from
  the training split (`vocab.txt`). Both are written to the model directory
  on first use and read back on resume, so a resumed or evaluated run
  tokenizes exactly as the run that trained the model.

  Args:
    dataset: a `tfadv.data.base.TextDataset`: `ClueDataset`,
      `ProductReviews`, or your own.
    sequence_length: tokens per example, `[CLS]` and `[SEP]` included.
    preset: a pretrained checkpoint, whose tokenizer and weights replace
      the character vocabulary and random initialisation: a keras-hub preset
      name (`"bert_base_zh"`) or directory (local or `gs://`), a Hugging Face
      BERT directory (`config.json` with `model_type` "bert", `vocab.txt`,
      `tokenizer_config.json`, `model.safetensors`: bert-base-chinese,
      hfl/chinese-roberta-wwm-ext, hfl/chinese-macbert-base) or handle
      (`"hf://bert-base-chinese"`), read by keras-hub's converter. A local
      directory that does not exist is an error naming the command that
      makes it (`make pretrain` for `runs/pretrain_mlm_zh/preset`); another
      architecture, or weights only in PyTorch's format, is one line naming
      the fix.
    vocabulary_size: upper bound for the built character vocabulary.
    vocabulary_min_count: characters rarer than this map to `[UNK]`.

  Example:
  >>> task = TextClassificationTask(ProductReviews(num_train=500, num_eval=100))
  >>> task.prepare("/tmp/run")
  >>> model = task.build_model()
  >>> arrays = task.arrays("train")  # token_ids, segment_ids, ..., label
  """

  embedding_layer = "token_embedding"

  def __init__(self, dataset=gin.REQUIRED, sequence_length: int = 128,
               preset: Optional[str] = None, vocabulary_size: int = 8000,
               vocabulary_min_count: int = 2):
    checks.check("TextClassificationTask",
                 sequence_length=(sequence_length, checks.AT_LEAST_TWO),
                 vocabulary_size=(vocabulary_size, checks.AT_LEAST_ONE),
                 vocabulary_min_count=(vocabulary_min_count, checks.AT_LEAST_ONE))
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

  def vocabulary(self) -> list:
    """The tokenizer's tokens, by id (after `prepare`)."""
    return list(self.preprocessor.tokenizer.get_vocabulary())

  def prepare(self, model_dir: str) -> None:
    """Loads or creates the label mapping and tokenizer for `model_dir`."""
    if self.preset:  # before anything is written
      self._check_preset()
    # Every split is read (and its labels checked) before training, not
    # after it: a broken record stops the run before anything is written.
    # (A record store's rows were checked when it was written.)
    labels_by_split = {} if self.record_store else {
        split: self.dataset.examples(split)[1] for split in self.dataset.splits}
    self.label_names = load_or_save_labels(
        model_dir, self.dataset.label_names, self.dataset.name)
    for split, labels in labels_by_split.items():
      self._check_labels(split, labels)
    if self.preset:
      self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
          self.preset, sequence_length=self.sequence_length)
      return
    vocabulary = vocab_lib.load_or_build_vocabulary(
        model_dir, lambda: flatten_texts(self.dataset.examples("train")[0]),
        self.vocabulary_size, self.vocabulary_min_count)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=self.sequence_length)

  def _check_labels(self, split: str, raw_labels) -> Dict[str, int]:
    """{label: class index}; a label the model has no class for is an
    `InputDataError` naming its record."""
    index = {name: i for i, name in enumerate(self.label_names)}
    unknown = [label for label in raw_labels if label not in index]
    if unknown:
      raise InputDataError(
          f"{self.dataset.where(split, unknown[0])}: label {unknown[0]!r} is not among "
          f"the model's {len(index)} classes ({len(set(unknown))} unknown labels in "
          f"{len(unknown)} records of the {split} split); evaluate data labelled "
          "like the training data, or list every label in the task's labels.json "
          "and train a new model dir.")
    return index

  def _check_preset(self):
    if checkpoint_kind(self.preset) == "name":
      return
    if not tf.io.gfile.exists(os.path.join(self.preset, "config.json")):
      how = ("make it with `make pretrain` (configs/pretrain_mlm_zh.gin, about an hour "
             "on 2 cores)" if os.path.normpath(self.preset).endswith(
                 os.path.normpath(PRETRAINED_PRESET)) else
             "point TextClassificationTask.preset at a keras-hub preset directory or a "
             "Hugging Face BERT directory")
      raise MissingInputError(
          f"Preset not found: {self.preset} (no config.json); {how}, or train from "
          "scratch with --gin_param=\"TextClassificationTask.preset = None\".")
    check_checkpoint_dir(self.preset, self.sequence_length)

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
    """Tokenized features and class indices of `split` ("train", "validation", "eval")."""
    texts, raw_labels = self.dataset.examples(split)
    index = self._check_labels(split, raw_labels)
    out = {k: [] for k in FEATURES}
    chunk = 2048
    for start in range(0, len(texts), chunk):
      batch = self.preprocessor(x=preprocessor_input(texts[start:start + chunk]))
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
