"""keras-hub BERT classifiers, built from a config or loaded from a preset."""

from typing import Optional

import gin
import keras_hub

from tfadv import checks
from tfadv.errors import SettingError


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
