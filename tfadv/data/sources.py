"""Example sources: where the input pipeline reads a split's rows from.

The pipeline (`tfadv.data.pipeline`) computes, for every step and replica,
which example indices it needs; a source turns a batch of indices into a
batch of features, inside the `tf.data` graph. Three sources share that
contract:

- `ArraySource`: the split held in memory as arrays (`Task.arrays`), read
  by `tf.gather`: the default, for data that fits on every host;
- `tfadv.data.records.RecordSource`: a record store on disk (ArrayRecord
  shards written by `python -m tfadv.tools.write_records`), read by batched
  random access: only the rows a host's replicas take are ever read;
- `TfdsSource`: a TFDS dataset prepared in ArrayRecord format, through
  `tfds.data_source`, on the same path.

Because a source is addressed by index only, the order of examples, and so
exact resume, is the pipeline's (a function of the step), whatever the
source: the same config and seed give bit-identical batches from every
source holding the same rows.

Contract (`ExampleSource`):
  num_examples          rows of the split;
  specs                 {name: tf.TensorSpec} of one example's features;
  read(indices)         int64 [b] -> {name: [b, ...]}, in graph;
  head(count)           the first `count` rows as numpy arrays;
  spread(count)         `count` rows evenly spaced over the split (the
                        attacked examples a reader sees).

Example:
>>> source = ArraySource({"x": np.arange(6).reshape(3, 2), "y": np.arange(3)})
>>> source.num_examples, source.specs["x"].shape
(3, TensorShape([2]))
>>> source.read(tf.constant([2, 0]))["y"].numpy()
array([2, 0])
"""

import abc
import threading
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tfadv.errors import MissingInputError


class ExampleSource(abc.ABC):
  """Rows of one split, addressed by index (see the module docstring)."""

  num_examples: int
  specs: Dict[str, tf.TensorSpec]
  # True where `read` calls Python (a `tf.numpy_function`): such a source
  # cannot feed an input pipeline that runs without Python (a TPU pod slice's).
  reads_in_python: bool = False

  @abc.abstractmethod
  def read(self, indices: tf.Tensor) -> Dict[str, tf.Tensor]:
    """{name: [len(indices), ...]}: the rows at `indices` (int64 [b]), in graph."""

  def rows(self, indices) -> Dict[str, np.ndarray]:
    """The rows at `indices` as numpy arrays."""
    return {k: v.numpy() for k, v in
            self.read(tf.constant(np.asarray(indices, np.int64))).items()}

  def head(self, count: int) -> Dict[str, np.ndarray]:
    """The first `count` rows as numpy arrays."""
    return self.rows(np.arange(min(count, self.num_examples)))

  def spread(self, count: int) -> Dict[str, np.ndarray]:
    """`count` rows evenly spaced over the split, in order (all of them when
    it has no more): a sample of a file grouped by label shows every part."""
    n = self.num_examples
    return self.rows(np.unique(np.linspace(0, n - 1, min(count, n)).round()))


class ArraySource(ExampleSource):
  """A split held in memory: equal-length numpy arrays, read by `tf.gather`."""

  def __init__(self, arrays: Dict[str, np.ndarray]):
    if not arrays:
      raise ValueError("ArraySource: no arrays.")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource: arrays of different lengths {lengths}.")
    self.arrays = arrays
    self.num_examples = next(iter(lengths.values()))
    self.specs = {k: tf.TensorSpec(np.shape(v)[1:], tf.as_dtype(np.asarray(v).dtype))
                  for k, v in arrays.items()}
    self._tensors = None

  def read(self, indices):
    if self._tensors is None:  # eager constants, captured by every graph that reads
      with tf.init_scope():
        self._tensors = {k: tf.constant(v) for k, v in self.arrays.items()}
    return {k: tf.gather(t, indices) for k, t in self._tensors.items()}

  def head(self, count):
    return {k: np.asarray(v[:count]) for k, v in self.arrays.items()}


class PythonReadSource(ExampleSource):
  """A source whose rows come from Python random access, one call a batch.

  Subclasses implement `_read_serialized(indices) -> list of bytes` (any
  thread may call it: keep per-thread readers) and `_decode(strings)`, the
  in-graph decoding of a batch of those strings. The Python call runs in the
  `tf.data` map, which the pipeline runs in parallel ahead of the step.
  """

  reads_in_python = True

  def _read_serialized(self, indices: np.ndarray) -> List[bytes]:
    raise NotImplementedError

  def _decode(self, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    raise NotImplementedError

  def read(self, indices):
    def py_read(values):
      return np.asarray(self._read_serialized(values), dtype=object)
    serialized = tf.numpy_function(py_read, [indices], tf.string, stateful=False)
    serialized.set_shape(indices.shape)
    return self._decode(serialized)


def decode_images(encoded: tf.Tensor, spec: tf.TensorSpec) -> tf.Tensor:
  """[b] encoded images (PNG, JPEG) -> [b, *spec.shape] `spec.dtype`, in graph."""
  return tf.map_fn(
      lambda s: tf.ensure_shape(tf.io.decode_image(s, channels=spec.shape[-1],
                                                   expand_animations=False), spec.shape),
      encoded, fn_output_signature=tf.TensorSpec(spec.shape, spec.dtype))


def decode_raw(data: tf.Tensor, spec: tf.TensorSpec) -> tf.Tensor:
  """[b] strings of raw little-endian values -> [b, *spec.shape] `spec.dtype`."""
  flat = tf.io.decode_raw(data, spec.dtype)
  shape = tf.concat([tf.shape(data), tf.constant(spec.shape.as_list(), tf.int32)], 0)
  tensor = tf.reshape(flat, shape)
  tensor.set_shape(data.shape.concatenate(spec.shape))
  return tensor


class TfdsSource(ExampleSource):
  """A TFDS dataset prepared in ArrayRecord format, read by `tfds.data_source`.

  Images stay encoded on disk and are decoded in the input graph
  (`tfds.decode.SkipDecoding`); fixed-size images get their static shape
  from the dataset's features, variable-size ones (ImageNet) stay strings
  for the task's crop (`ImageClassificationTask.crop`).

  Args:
    name: the TFDS name ("imagenet2012", "cifar10", a local builder's name).
    split: the TFDS split ("train", "test", "validation", "train[:1000]").
    data_dir: TFDS's data dir (None: TFDS's default).
    features: {tfadv name: TFDS feature name}; default image/label.
    download: download and prepare (ArrayRecord) a dataset TFDS can fetch
      itself when it is not prepared; False: that is an error.
  """

  reads_in_python = True  # tfds.data_source, through tf.numpy_function

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               features: Optional[Dict[str, str]] = None, download: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split, self.data_dir = name, split, data_dir
    self.features = features or {"image": "image", "label": "label"}
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise MissingInputError(
          f"TFDS has no dataset {name!r}: import the module that defines its "
          "builder, or check ImageDataset.name.") from None
    if not builder.is_prepared() and download:
      builder.download_and_prepare(file_format="array_record")
    if not builder.is_prepared():
      raise MissingInputError(
          f"TFDS dataset {name} is not prepared in {builder.data_dir}: run "
          f"`tfds build {name} --file_format=array_record"
          + (f" --data_dir={data_dir}" if data_dir else "") + "` first.")
    if builder.info.file_format.value != "array_record":
      raise MissingInputError(
          f"TFDS dataset {name} in {builder.data_dir} is in "
          f"{builder.info.file_format.value} format; random access needs "
          f"`tfds build {name} --file_format=array_record` (or "
          "ImageDataset.source='tfds_in_memory').")
    self.info = builder.info
    self._source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False,
        decoders={k: tfds.decode.SkipDecoding() for k in self.features.values()
                  if isinstance(self.info.features[k], tfds.features.Image)})
    self.num_examples = len(self._source)
    self.specs = {}
    for ours, theirs in self.features.items():
      feature = self.info.features[theirs]
      if isinstance(feature, tfds.features.Image):
        shape = feature.shape
        if None in shape:  # variable size: encoded bytes for the task's crop
          self.specs[ours] = tf.TensorSpec([], tf.string)
        else:
          self.specs[ours] = tf.TensorSpec(shape, tf.uint8)
      else:
        self.specs[ours] = tf.TensorSpec(feature.shape, tf.as_dtype(feature.np_dtype))
    self._lock = threading.Lock()

  def label_names(self) -> List[str]:
    return list(self.info.features[self.features.get("label", "label")].names)

  def read(self, indices):
    names = list(self.features)

    def py_read(values):
      with self._lock:
        rows = self._source.__getitems__([int(v) for v in values])
      columns = []
      for ours in names:
        values_of = [row[self.features[ours]] for row in rows]
        if self.specs[ours].dtype == tf.string or self.specs[ours].dtype == tf.uint8:
          columns.append(np.asarray(values_of, dtype=object))
        else:
          columns.append(np.asarray(values_of, self.specs[ours].dtype.as_numpy_dtype))
      return columns

    out_types = [tf.string if self.specs[k].dtype in (tf.string, tf.uint8)
                 else self.specs[k].dtype for k in names]
    columns = tf.numpy_function(py_read, [indices], out_types, stateful=False)
    batch = {}
    for name, column in zip(names, columns):
      spec = self.specs[name]
      if spec.dtype == tf.uint8:  # encoded fixed-size image: decode in graph
        column.set_shape(indices.shape)
        column = decode_images(column, spec)
      else:
        column.set_shape(indices.shape.concatenate(spec.shape))
      batch[name] = column
    return batch
