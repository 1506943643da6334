"""Masked-language-model pretraining of a keras-hub BERT, written out as a preset.

The same `Experiment`, trainer, strategies, checkpoints and resume as
fine-tuning: only the task differs. Masking is keras-hub's own
(`BertMaskedLMPreprocessor`: 15% of tokens selected, of which 80% become
`[MASK]`, 10% a random token, 10% stay), applied *statically* as in the
original BERT data pipeline: each training sentence is masked
`masks_per_sentence` times with different draws, once, and the masked copies
are saved in the model directory (`mlm_data/`). A resumed run reads them back,
so it trains on exactly the batches the uninterrupted run would have seen.

At the end of training the task writes a keras-hub preset directory
(`<model_dir>/preset`: `config.json`, `model.weights.h5`, `tokenizer.json`,
`assets/tokenizer/vocabulary.txt`, `metadata.json`) that
`keras_hub.models.BertTextClassifier.from_preset(path)` loads offline, and
that every fine-tuning config points at with one binding:
`TextClassificationTask.preset = 'runs/pretrain_mlm_zh/preset'`.
"""

import io
import os
from typing import Dict, List, Optional

import gin
import keras
import keras_hub
import numpy as np
import tensorflow as tf
from absl import logging

from tfadv import checks
from tfadv.data import vocab as vocab_lib
from tfadv.data.corpus import PretrainingCorpus, pack  # pylint: disable=unused-import
from tfadv.models.bert import bert_masked_lm
from tfadv.tasks.base import Task

FEATURES = ("token_ids", "segment_ids", "padding_mask", "mask_positions")
TARGETS = ("mask_ids", "mask_weights")


@gin.configurable
class MaskedLMTask(Task):
  """Pretrains `keras_hub.models.BertMaskedLM` on a `PretrainingCorpus`.

  Reported accuracy is masked-token accuracy (`masked_accuracy`): the
  fraction of selected positions whose original token the model predicts.
  The loss is each sentence's mean cross-entropy over its selected
  positions, averaged over sentences.

  Args:
    corpus: a `PretrainingCorpus`.
    sequence_length: tokens per example, `[CLS]`/`[SEP]` included; also the
      backbone's `max_sequence_length` (fine-tuning may use up to this).
    vocabulary_size, vocabulary_min_count: the character vocabulary built
      from the corpus's train sentences (`tfadv.data.vocab`).
    mask_selection_rate: fraction of tokens selected for prediction.
    mask_selection_length: most selected tokens per sentence.
    masks_per_sentence: differently masked copies of each training sequence.
    pack_characters: consecutive sentences are joined (by a space) into
      sequences of about this many characters, so that a batch carries
      text rather than padding (RoBERTa's "full sentences"); 0 keeps one
      sentence per sequence.
    preset_dir: where the preset goes (default `<model_dir>/preset`).

  Example:
  >>> task = MaskedLMTask(PretrainingCorpus("../shared/data/fewclue"))
  >>> task.prepare("/tmp/mlm")
  >>> model = task.build_model()  # BertMaskedLM, size from `bert_masked_lm`
  """

  accuracy_name = "masked_accuracy"
  eval_split = "heldout"

  def __init__(self, corpus=gin.REQUIRED, sequence_length: int = 128,
               vocabulary_size: int = 8000, vocabulary_min_count: int = 2,
               mask_selection_rate: float = 0.15, mask_selection_length: int = 20,
               masks_per_sentence: int = 4, pack_characters: int = 0,
               preset_dir: Optional[str] = None, seed: int = 0):
    checks.check("MaskedLMTask", sequence_length=(sequence_length, checks.AT_LEAST_TWO),
                 vocabulary_size=(vocabulary_size, checks.AT_LEAST_ONE),
                 vocabulary_min_count=(vocabulary_min_count, checks.AT_LEAST_ONE),
                 mask_selection_rate=(mask_selection_rate, checks.FRACTION),
                 mask_selection_length=(mask_selection_length, checks.AT_LEAST_ONE),
                 masks_per_sentence=(masks_per_sentence, checks.AT_LEAST_ONE),
                 pack_characters=(pack_characters, checks.NON_NEGATIVE_INT))
    self.corpus = corpus
    self.sequence_length = sequence_length
    self.vocabulary_size = vocabulary_size
    self.vocabulary_min_count = vocabulary_min_count
    self.mask_selection_rate = mask_selection_rate
    self.mask_selection_length = mask_selection_length
    self.masks_per_sentence = masks_per_sentence
    self.pack_characters = pack_characters
    self.preset_dir = preset_dir
    self.seed = seed
    self.preprocessor = None
    self.model_dir = None
    self._arrays: Dict[str, Dict[str, np.ndarray]] = {}

  def prepare(self, model_dir: str) -> None:
    self.model_dir = model_dir
    vocabulary = vocab_lib.load_or_build_vocabulary(
        model_dir, lambda: self.corpus.examples("train")[0], self.vocabulary_size,
        self.vocabulary_min_count)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    self.preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer, sequence_length=self.sequence_length,
        mask_selection_rate=self.mask_selection_rate,
        mask_selection_length=self.mask_selection_length)

  def build_model(self) -> keras.Model:
    return bert_masked_lm(
        vocabulary_size=self.preprocessor.tokenizer.vocabulary_size(),
        sequence_length=self.sequence_length, preprocessor=self.preprocessor)

  def _mask(self, texts: List[str], copies: int, seed: int) -> Dict[str, np.ndarray]:
    """BERT's masking, with keras-hub's rates, drawn from `seed` by numpy.

    keras-hub's preprocessor tokenizes and packs (a tf.data map); the masks
    are drawn here rather than by its masker, whose TensorFlow random ops
    take their seeds from the process's op counter: the same seed gave other
    masks after other work in the same process (seen in the test suite).
    Per sequence: each non-special token is selected with probability
    `mask_selection_rate` (at most `mask_selection_length`, a random subset
    when more), and a selected token becomes [MASK] (`mask_token_rate`, 80%),
    a random token (`random_token_rate`, 10%) or stays.
    """
    pre = self.preprocessor
    if pre.packer is None:  # keras-hub makes its packer when first built
      pre.build(None)
    pack = lambda x: pre.packer(pre.tokenizer(x))
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(texts)).batch(1024).map(pack)
    packed = list(dataset.as_numpy_iterator())
    token_ids = np.tile(np.concatenate([ids for ids, _ in packed]), (copies, 1))
    segment_ids = np.tile(np.concatenate([seg for _, seg in packed]), (copies, 1))
    rng = np.random.RandomState(seed)
    special = np.array(pre.tokenizer.special_token_ids)
    length = self.mask_selection_length
    n = len(token_ids)
    positions = np.zeros((n, length), np.int32)
    mask_ids = np.zeros((n, length), np.int32)
    weights = np.zeros((n, length), np.float32)
    masked = token_ids.copy()
    vocabulary = pre.tokenizer.vocabulary_size()
    for i in range(n):
      eligible = np.nonzero(~np.isin(token_ids[i], special))[0]
      chosen = eligible[rng.random_sample(len(eligible)) < self.mask_selection_rate]
      if len(chosen) > length:
        chosen = np.sort(rng.choice(chosen, length, replace=False))
      k = len(chosen)
      draw = rng.random_sample(k)
      replacement = token_ids[i, chosen].copy()
      replacement[draw < pre.mask_token_rate] = pre.tokenizer.mask_token_id
      random_ones = (draw >= pre.mask_token_rate) & (
          draw < pre.mask_token_rate + pre.random_token_rate)
      replacement[random_ones] = rng.randint(0, vocabulary, random_ones.sum())
      masked[i, chosen] = replacement
      positions[i, :k] = chosen
      mask_ids[i, :k] = token_ids[i, chosen]
      weights[i, :k] = 1.0
    pad = pre.tokenizer.pad_token_id
    return {"token_ids": masked.astype(np.int32),
            "segment_ids": segment_ids.astype(np.int32),
            "padding_mask": token_ids != pad, "mask_positions": positions,
            "mask_ids": mask_ids, "mask_weights": weights}

  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    """Masked examples of `split`, made once and kept in `<model_dir>/mlm_data`."""
    if split in self._arrays:
      return self._arrays[split]
    path = os.path.join(self.model_dir, "mlm_data", f"{split}.npz")
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, "rb") as f:
        arrays = dict(np.load(io.BytesIO(f.read())))
    else:
      copies = self.masks_per_sentence if split == "train" else 1
      sentences, _ = self.corpus.examples(split)
      texts = pack(sentences, self.pack_characters)
      arrays = self._mask(texts, copies, self.seed + (0 if split == "train" else 1))
      tf.io.gfile.makedirs(os.path.dirname(path))
      buffer = io.BytesIO()
      np.savez_compressed(buffer, **arrays)
      with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
      logging.info("Masked %d %s sequences (%d sentences) x %d: %s", len(texts),
                   split, len(sentences), copies, path)
    self._arrays[split] = arrays
    return arrays

  @staticmethod
  def split_batch(batch):
    return ({k: batch[k] for k in FEATURES},
            {"ids": batch["mask_ids"], "weights": batch["mask_weights"]})

  @staticmethod
  def per_example_loss(labels, logits):
    weights = tf.cast(labels["weights"], tf.float32)
    per_token = keras.losses.sparse_categorical_crossentropy(
        labels["ids"], tf.cast(logits, tf.float32), from_logits=True)
    return tf.reduce_sum(per_token * weights, -1) / tf.maximum(
        tf.reduce_sum(weights, -1), 1.0)

  @staticmethod
  def count_correct(labels, logits, example_weights):
    """(correctly predicted masked tokens, masked tokens), both weighted."""
    weights = tf.cast(labels["weights"], tf.float32) * example_weights[:, None]
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels["ids"].dtype),
                            labels["ids"]), tf.float32)
    return tf.reduce_sum(hits * weights), tf.reduce_sum(weights)

  def write_preset(self, model: keras.Model, preset_dir: str) -> str:
    """Backbone config + weights and the tokenizer, as a keras-hub preset."""
    tf.io.gfile.makedirs(preset_dir)
    model.backbone.save_to_preset(preset_dir)
    self.preprocessor.tokenizer.save_to_preset(preset_dir)
    return preset_dir

  def finish_training(self, model: keras.Model, model_dir: str) -> str:
    return self.write_preset(model, self.preset_dir or os.path.join(model_dir, "preset"))

  def export(self, model: keras.Model, export_dir: str) -> str:
    return self.write_preset(model, export_dir)
