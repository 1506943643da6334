"""Image classification datasets: TFDS, or local IDX files (MNIST layout).

TFDS datasets prepared in ArrayRecord format are read by random access
(`tfds.data_source`, `tfadv.data.sources.TfdsSource`): only the rows a step
needs are read, so a dataset larger than memory (ImageNet) trains. Smaller
ones can still be loaded whole (`source="tfds_in_memory"`).

Images are kept as uint8 arrays [N, H, W, C]; the task scales them to
[0, 1] inside the step, so a 60k-image dataset costs 47 MB, not 188 MB.

Local IDX files: Debian's `dataset-fashion-mnist` package installs
Fashion-MNIST's four IDX files (gzipped) under /usr/share/; their bytes are
not those TFDS checksums, so they are read directly here rather than through
TFDS's manual-download path.
"""

import gzip
import os
import struct
import zlib
from typing import Dict, List, Optional

import gin
import numpy as np
import tensorflow as tf

from tfadv.data.base import ArrayDataset, carve_validation
from tfadv import checks
from tfadv.errors import InputDataError, MissingInputError, SettingError

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog",
                  "frog", "horse", "ship", "truck"]
LABEL_NAMES = {"fashion_mnist": FASHION_MNIST_LABELS,
               "mnist": [str(i) for i in range(10)],
               "cifar10": CIFAR10_LABELS}
# Where Debian's packages put the IDX files (`dpkg -L dataset-fashion-mnist`).
DEFAULT_IDX_DIRS = {"fashion_mnist": ["/usr/share/fashion-mnist",
                                      "/usr/share/dataset-fashion-mnist",
                                      "/usr/share/datasets/fashion-mnist"],
                    "mnist": ["/usr/share/mnist", "/usr/share/datasets/mnist"]}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_DTYPES = {0x08: np.uint8}


class IdxFormatError(InputDataError):
  """An IDX file whose header or size does not match its contents."""


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped; local or gs://) into a numpy array."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
      raise IdxFormatError(f"{path}: not a complete gzip file ({e}); download or "
                           "install it again.") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise IdxFormatError(f"{path}: not an IDX file (magic bytes {data[:4]!r}).")
  dtype_code, ndim = data[2], data[3]
  if dtype_code not in IDX_DTYPES:
    raise IdxFormatError(f"{path}: IDX element type 0x{dtype_code:02x} is not "
                         "supported (only unsigned bytes, 0x08).")
  header = 4 + 4 * ndim
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(shape))
  if len(data) - header != expected:
    raise IdxFormatError(f"{path}: header says shape {shape} ({expected} bytes) "
                         f"but the file holds {len(data) - header} bytes.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_idx_file(directory: str, stem: str) -> str:
  for candidate in (stem, stem + ".gz"):
    for pattern in (candidate, os.path.join("*", candidate)):
      matches = tf.io.gfile.glob(os.path.join(directory, pattern))
      if matches:
        return sorted(matches)[0]
  raise FileNotFoundError(f"No {stem}[.gz] under {directory}.")


SOURCES = ("auto", "idx", "tfds", "tfds_in_memory")


@gin.configurable
class ImageDataset(ArrayDataset):
  """An image classification dataset as uint8 arrays.

  Args:
    name: "fashion_mnist", "mnist" or "cifar10" (TFDS names).
    source: "idx" (local IDX files; MNIST-style datasets only), "tfds"
      (a TFDS dataset prepared in ArrayRecord format, read by random access;
      `tfds build NAME --file_format=array_record` prepares one),
      "tfds_in_memory" (any prepared TFDS dataset, loaded whole, downloaded
      if missing), or "auto": IDX files if `data_dir` or a Debian package has
      them, else "tfds" for datasets without IDX files (CIFAR-10, ImageNet);
      an MNIST-style dataset whose IDX files are missing is an error naming
      the package to install.
    data_dir: directory of the IDX files, or TFDS's data dir.
    num_train, num_eval: keep the first examples of each split (None: all).
    tfds_eval_split: the TFDS split evaluated ("test"; ImageNet's is
      "validation").
    download: with source "tfds", download and prepare (in ArrayRecord
      format) a dataset TFDS can fetch itself (CIFAR-10) when it is missing;
      False: a missing dataset is an error naming `tfds build`.
    validation_fraction: the share of train (after `num_train`) carved off as
      the "validation" split, stratified by label and seeded
      (`tfadv.data.base.carve_validation`): training reads the rest, and a
      choice (a default, a clamp rule) is made on it, never on test. 0: no
      validation split. Needs the arrays in memory (source "idx" or
      "tfds_in_memory").
    validation_seed: the carving's seed (fixed: every run of a selection
      carves the same examples).

  Example:
  >>> data = ImageDataset("fashion_mnist", source="idx")
  >>> arrays = data.arrays("train")
  >>> arrays["image"].shape, arrays["label"].shape
  ((60000, 28, 28, 1), (60000,))
  """

  def __init__(self, name: str = "fashion_mnist", source: str = "auto",
               data_dir: Optional[str] = None, num_train: Optional[int] = None,
               num_eval: Optional[int] = None, tfds_eval_split: str = "test",
               download: bool = True, validation_fraction: float = 0.0,
               validation_seed: int = 0):
    checks.check("ImageDataset", source=(source, checks.one_of(SOURCES)),
                 num_train=(num_train, checks.AT_LEAST_ONE),
                 num_eval=(num_eval, checks.AT_LEAST_ONE))
    self.name = name
    self.source = source
    self.data_dir = data_dir
    self.num_train = num_train
    self.num_eval = num_eval
    self.tfds_eval_split = tfds_eval_split
    self.download = download
    self.validation_fraction = validation_fraction
    self.validation_seed = validation_seed
    if validation_fraction and not 0.0 < validation_fraction < 1.0:
      raise SettingError(f"ImageDataset.validation_fraction={validation_fraction}; "
                         "expected 0 < fraction < 1 (or 0: no validation split).")

  @property
  def splits(self):
    return ("train", "validation", "eval") if self.validation_fraction else ("train", "eval")

  @property
  def eval_split(self) -> str:
    """"test" (IDX t10k, TFDS "test"); "test_first<N>" with `num_eval`, so an
    evaluation of a subset is recorded beside the whole test set's, never
    over it (`eval_results_test_first2000.json`)."""
    base = self.tfds_eval_split
    return base if not self.num_eval else f"{base}_first{self.num_eval}"

  def label_names(self) -> List[str]:
    if self.name in LABEL_NAMES:
      return LABEL_NAMES[self.name]
    if self._resolved_source() == "tfds":  # the builder's own class names
      return self.example_source("train").label_names()
    raise ValueError(f"ImageDataset.name={self.name!r}; known: {sorted(LABEL_NAMES)}, "
                     "or any TFDS dataset with source='tfds'.")

  def _tfds_split(self, split: str) -> str:
    tfds_split = "train" if split == "train" else self.tfds_eval_split
    limit = self.num_train if split == "train" else self.num_eval
    return f"{tfds_split}[:{limit}]" if limit else tfds_split

  def example_source(self, split: str):
    """A random-access source of `split` (source "tfds"), else None (arrays)."""
    self.check_split(split)
    if self._resolved_source() != "tfds":
      return None
    if self.validation_fraction:
      raise SettingError(
          f"ImageDataset.validation_fraction={self.validation_fraction} carves train in "
          f"memory, but {self.name} is read by random access (source 'tfds'): set "
          "ImageDataset.source = 'tfds_in_memory', or validate on a split of its own.")
    from tfadv.data.sources import TfdsSource  # pylint: disable=g-import-not-at-top
    return TfdsSource(self.name, self._tfds_split(split), data_dir=self.data_dir,
                      download=self.download)

  def _idx_dir(self) -> Optional[str]:
    candidates = [self.data_dir] if self.data_dir else DEFAULT_IDX_DIRS.get(self.name, [])
    for directory in candidates:
      if directory and tf.io.gfile.isdir(directory):
        try:
          find_idx_file(directory, IDX_FILES["train"][0])
          return directory
        except FileNotFoundError:
          continue
    return None

  def _resolved_source(self) -> str:
    if self.source != "auto":
      return self.source
    if self._idx_dir():
      return "idx"
    if self.name in DEFAULT_IDX_DIRS:
      self._missing_idx()
    return "tfds"

  def _missing_idx(self):
    where = [self.data_dir] if self.data_dir else DEFAULT_IDX_DIRS.get(self.name)
    raise MissingInputError(
        f"{self.name} not found: no IDX files in {where}. Install them with "
        f"`apt-get install -y dataset-{self.name.replace('_', '-')}`, or set "
        "ImageDataset.data_dir (or ImageDataset.source = 'tfds' to download).")

  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    """{"image": uint8 [N, H, W, C], "label": int32 [N]} of "train" (less
    validation), "validation" or "eval"."""
    self.check_split(split)
    if self.validation_fraction and split != "eval":
      # (Source "tfds": reading train refuses the carve, in `example_source`.)
      whole = self._whole_arrays("train")
      train, validation = carve_validation(whole["label"], self.validation_fraction,
                                           self.validation_seed)
      chosen = train if split == "train" else validation
      return {key: np.ascontiguousarray(value[chosen]) for key, value in whole.items()}
    return self._whole_arrays(split)

  def _whole_arrays(self, split: str) -> Dict[str, np.ndarray]:
    source = self._resolved_source()
    if source == "idx":
      images, labels = self._read_idx(split)
    elif source == "tfds_in_memory":
      images, labels = self._read_tfds(split)
    else:  # "tfds": read the random-access source whole (e.g. for a store)
      whole = self.example_source(split)
      return whole.head(whole.num_examples)
    limit = self.num_train if split == "train" else self.num_eval
    if limit:
      images, labels = images[:limit], labels[:limit]
    if images.ndim == 3:
      images = images[..., None]
    return {"image": np.ascontiguousarray(images, np.uint8),
            "label": labels.astype(np.int32)}

  def _read_idx(self, split):
    directory = self._idx_dir()
    if directory is None:
      self._missing_idx()
    image_stem, label_stem = IDX_FILES[split]
    images = read_idx(find_idx_file(directory, image_stem))
    labels = read_idx(find_idx_file(directory, label_stem))
    if len(images) != len(labels):
      raise IdxFormatError(f"{directory}: {len(images)} {split} images but "
                           f"{len(labels)} labels.")
    return images, labels

  def _read_tfds(self, split):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds_split = "train" if split == "train" else self.tfds_eval_split
    images, labels = tfds.as_numpy(tfds.load(
        self.name, split=tfds_split, batch_size=-1, as_supervised=True,
        data_dir=self.data_dir))
    return images, labels
