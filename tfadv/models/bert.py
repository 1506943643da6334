"""keras-hub BERT classifiers, built from a config or loaded from a pretrained checkpoint.

Checkpoints: a keras-hub preset (name or directory) or a Hugging Face BERT
checkpoint (directory or `hf://` handle), converted by keras-hub on load
(`keras_hub.src.utils.transformers.convert_bert`): the tokenizer comes
from the checkpoint's `vocab.txt`, the token-embedding table is
`backbone.token_embedding.embeddings` in both.
"""

import json
import os
from typing import Optional

import gin
import keras_hub
import tensorflow as tf

from tfadv import checks
from tfadv.errors import MissingInputError, SettingError

# Hugging Face `model_type`s of BERT's architecture (Chinese RoBERTa-wwm and
# MacBERT checkpoints are BERT-architecture: their config says "bert").
HF_BERT_TYPES = ("bert",)
REMOTE_SCHEMES = ("hf://", "kaggle://")


def checkpoint_kind(preset: str) -> str:
  """"name" (a keras-hub preset name or an hf:// / kaggle:// handle, fetched
  by keras-hub) or "dir" (a local or gs:// directory)."""
  if preset.startswith(REMOTE_SCHEMES):
    return "name"
  local = (preset.startswith(("gs://", "/", ".")) or os.sep in preset
           or os.path.exists(preset))
  return "dir" if local else "name"


def check_checkpoint_dir(preset: str, sequence_length: int) -> str:
  """The format of checkpoint directory `preset` ("keras" or "transformers"),
  after checking it can be fine-tuned; a checkpoint that cannot is one line
  naming the fix."""
  with tf.io.gfile.GFile(os.path.join(preset, "config.json")) as f:
    config = json.load(f)
  if "registered_name" in config:
    return "keras"
  model_type = config.get("model_type")
  if model_type is None:
    raise SettingError(f"{preset}/config.json is neither a keras-hub preset's (no "
                       "'registered_name') nor a Hugging Face checkpoint's (no "
                       "'model_type'); point TextClassificationTask.preset at one of them.")
  if model_type not in HF_BERT_TYPES:
    raise SettingError(f"{preset}: Hugging Face model_type {model_type!r} is not supported; "
                       f"tfadv fine-tunes BERT-architecture checkpoints (model_type "
                       f"{HF_BERT_TYPES}), e.g. bert-base-chinese or hfl/chinese-roberta-wwm-ext.")
  exists = lambda name: tf.io.gfile.exists(os.path.join(preset, name))
  if not (exists("model.safetensors") or exists("model.safetensors.index.json")):
    found = [n for n in ("pytorch_model.bin", "tf_model.h5") if exists(n)]
    raise MissingInputError(
        f"{preset}: no model.safetensors" + (f" (only {found[0]})" if found else "")
        + "; keras-hub reads Hugging Face weights in safetensors format: save them with "
        "`transformers`' save_pretrained(..., safe_serialization=True) or download "
        "the checkpoint's model.safetensors.")
  for name in ("vocab.txt", "tokenizer_config.json"):
    if not exists(name):
      raise MissingInputError(
          f"{preset}: no {name}; a Hugging Face BERT checkpoint's tokenizer is its "
          "vocab.txt and tokenizer_config.json (with do_lower_case): copy them from "
          "the checkpoint's repository.")
  positions = config.get("max_position_embeddings")
  if positions is not None and sequence_length > positions:
    raise SettingError(f"TextClassificationTask.sequence_length = {sequence_length} is "
                       f"out of range: {preset} has {positions} positions.")
  return "transformers"


def check_size(owner: str, num_layers, num_heads, hidden_dim, intermediate_dim, dropout):
  checks.check(owner, num_layers=(num_layers, checks.AT_LEAST_ONE),
               num_heads=(num_heads, checks.AT_LEAST_ONE),
               hidden_dim=(hidden_dim, checks.AT_LEAST_ONE),
               intermediate_dim=(intermediate_dim, checks.AT_LEAST_ONE),
               dropout=(dropout, checks.OPEN_FRACTION))
  if hidden_dim % num_heads:
    raise SettingError(f"{owner}.hidden_dim = {hidden_dim} is not divisible by "
                       f"{owner}.num_heads = {num_heads}.")


@gin.configurable(denylist=["num_classes", "vocabulary_size", "sequence_length",
                            "preprocessor", "preset"])
def bert_classifier(num_classes: int, vocabulary_size: int, sequence_length: int,
                    preprocessor=None, preset: Optional[str] = None,
                    num_layers: int = 2, num_heads: int = 2, hidden_dim: int = 128,
                    intermediate_dim: int = 512, dropout: float = 0.1,
                    classifier_dropout: float = 0.1):
  """A `keras_hub.models.BertTextClassifier`.

  With `preset` (a keras-hub preset name such as `"bert_base_zh"` or a local
  preset directory) the backbone's pretrained weights are loaded and the size
  arguments are ignored; without one a randomly initialised backbone of the
  given size is built.

  Args:
    num_classes: number of output classes.
    vocabulary_size: rows of the token-embedding matrix.
    sequence_length: longest input, in tokens.
    preprocessor: attached to the model so that the exported model takes
      raw strings; training feeds it already tokenized batches.
    preset: keras-hub preset name or directory, or None.
    num_layers, num_heads, hidden_dim, intermediate_dim: backbone size.
    dropout: backbone dropout rate.
    classifier_dropout: dropout before the classification head.

  Example:
  >>> model = bert_classifier(num_classes=2, vocabulary_size=100,
  ...                         sequence_length=16, hidden_dim=32,
  ...                         intermediate_dim=64)
  >>> model.backbone.token_embedding.embeddings.shape
  TensorShape([100, 32])
  """
  check_size("bert_classifier", num_layers, num_heads, hidden_dim, intermediate_dim, dropout)
  checks.check("bert_classifier", classifier_dropout=(classifier_dropout, checks.OPEN_FRACTION))
  if preset:
    return keras_hub.models.BertTextClassifier.from_preset(
        preset, num_classes=num_classes, preprocessor=preprocessor,
        dropout=classifier_dropout)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=vocabulary_size, num_layers=num_layers,
      num_heads=num_heads, hidden_dim=hidden_dim,
      intermediate_dim=intermediate_dim, dropout=dropout,
      max_sequence_length=sequence_length)
  return keras_hub.models.BertTextClassifier(
      backbone, num_classes=num_classes, preprocessor=preprocessor,
      dropout=classifier_dropout)


@gin.configurable(denylist=["vocabulary_size", "sequence_length", "preprocessor"])
def bert_masked_lm(vocabulary_size: int, sequence_length: int, preprocessor=None,
                   num_layers: int = 2, num_heads: int = 2, hidden_dim: int = 128,
                   intermediate_dim: int = 512, dropout: float = 0.1):
  """A randomly initialised `keras_hub.models.BertMaskedLM` for pretraining.

  Its backbone (what a preset keeps) has `max_sequence_length =
  sequence_length`; the masked-LM head ties its output projection to the
  token embedding, as BERT does.

  Example:
  >>> model = bert_masked_lm(vocabulary_size=100, sequence_length=16,
  ...                        hidden_dim=32, intermediate_dim=64)
  >>> model.backbone.token_embedding.embeddings.shape
  TensorShape([100, 32])
  """
  check_size("bert_masked_lm", num_layers, num_heads, hidden_dim, intermediate_dim, dropout)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=vocabulary_size, num_layers=num_layers,
      num_heads=num_heads, hidden_dim=hidden_dim,
      intermediate_dim=intermediate_dim, dropout=dropout,
      max_sequence_length=sequence_length)
  return keras_hub.models.BertMaskedLM(backbone, preprocessor=preprocessor)
