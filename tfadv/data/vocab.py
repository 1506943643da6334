"""Character-level WordPiece vocabularies for Chinese text.

BERT's Chinese models tokenize CJK text one character at a time; a
vocabulary of the corpus's frequent characters therefore gives the same
tokenization as `bert-base-chinese` over the characters it covers. Latin
letters and digits enter both as word starts and as `##` continuations so
that words such as "iPhone" split into characters instead of `[UNK]`.
"""

import collections
import os
import string
from typing import Callable, Iterable, List

import tensorflow as tf
from absl import logging

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_cjk(ch: str) -> bool:
  cp = ord(ch)
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or
          0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF or
          0x2F800 <= cp <= 0x2FA1F)


def build_char_vocabulary(texts: Iterable[str], max_size: int = 8000,
                          min_count: int = 2) -> List[str]:
  """Builds a character vocabulary from `texts`.

  Args:
    texts: the training texts (never evaluation texts).
    max_size: upper bound on the vocabulary size, special tokens included.
    min_count: characters seen fewer times are left to `[UNK]`.

  Returns:
    The token list: special tokens, ASCII letters/digits with their `##`
    forms, then characters by decreasing frequency (ties by code point).

  Example:
  >>> vocab = build_char_vocabulary(["好评好评", "差评"], min_count=1)
  >>> vocab[:5], "好" in vocab
  (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'], True)
  """
  base = list(SPECIAL_TOKENS)
  ascii_chars = string.ascii_lowercase + string.digits
  base += list(ascii_chars) + ["##" + c for c in ascii_chars]
  counts = collections.Counter()
  for text in texts:
    counts.update(ch for ch in text.lower() if not ch.isspace())
  in_base = set(base)
  ranked = sorted((c for c, n in counts.items() if n >= min_count and c not in in_base),
                  key=lambda c: (-counts[c], c))
  return base + ranked[: max(0, max_size - len(base))]


def save_vocabulary(vocabulary: List[str], path: str) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write("\n".join(vocabulary) + "\n")


def load_vocabulary(path: str) -> List[str]:
  with tf.io.gfile.GFile(path, "r") as f:
    return [line.rstrip("\n") for line in f if line.rstrip("\n")]


def load_or_build_vocabulary(model_dir: str, texts: Callable[[], Iterable[str]],
                             max_size: int, min_count: int) -> List[str]:
  """`vocab.txt` of the model dir, or one built from `texts()` and saved there.

  `texts` is called only when the vocabulary is built (the training texts,
  never evaluation ones), so a resumed run tokenizes as the first one did.
  """
  path = os.path.join(model_dir, "vocab.txt")
  if tf.io.gfile.exists(path):
    return load_vocabulary(path)
  corpus = list(texts())
  vocabulary = build_char_vocabulary(corpus, max_size, min_count)
  tf.io.gfile.makedirs(model_dir)
  save_vocabulary(vocabulary, path)
  logging.info("Built a %d-token character vocabulary from %d texts: %s",
               len(vocabulary), len(corpus), path)
  return vocabulary
