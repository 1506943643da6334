"""Record stores: a task's examples on disk as ArrayRecord shards, read by index.

A store is a directory:

    metadata.json                      features, splits, shards, row counts
    labels.json                        the class order the rows were labelled in
    train-00000-of-00004.array_record  one `tf.train.Example` per row,
    ...                                written with group_size:1 (random access)

Every feature of a row is fixed-length: its raw bytes (`encoding: "raw"`,
any dtype and shape: token ids, segment ids, labels, uint8 images), or an
encoded image (`encoding: "png"`/`"jpeg"`, decoded in the input graph). Row
i of a split is row i of the arrays the store was written from, so
`RecordSource` gives, index for index, what `ArraySource` gives.

Write one with `python -m tfadv.tools.write_records --gin_file=... --out=DIR`
(from any task's config) or `write_store` (from arrays); train on it with
`--gin_param="Experiment.record_store='DIR'"`.

ArrayRecord reads local files: a store on `gs://` is copied to local disk
first (the TPU launcher does this), or read through a gcsfuse mount.

Example:
>>> write_store("/tmp/store", {"train": {"x": np.zeros((10, 4), np.float32),
...                                     "label": np.arange(10, dtype=np.int32)}})
>>> RecordSource("/tmp/store", "train").num_examples
10
"""

import json
import os
import shutil
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import tensorflow as tf

from tfadv.data.sources import PythonReadSource
from tfadv.errors import InputDataError, MissingInputError

FORMAT = "tfadv-records-1"
METADATA = "metadata.json"
LABELS = "labels.json"
ENCODINGS = ("raw", "png", "jpeg")
WRITE_HINT = "write one with `python -m tfadv.tools.write_records --gin_file=... --out=DIR`"


def _shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def _encode(value: np.ndarray, encoding: str) -> bytes:
  if encoding == "raw":
    return np.ascontiguousarray(value).tobytes()
  if encoding == "png":
    return tf.io.encode_png(value).numpy()
  return tf.io.encode_jpeg(value, quality=95).numpy()


def write_store(out_dir: str,
                splits: Dict[str, Union[Dict[str, np.ndarray], Callable[[], Dict[str, np.ndarray]]]],
                *, encodings: Optional[Dict[str, str]] = None,
                shard_bytes: int = 256 << 20, labels: Optional[List[str]] = None,
                description: str = "", prepared: Optional[List[str]] = None,
                chunk_rows: int = 4096) -> str:
  """Writes `splits` ({split: arrays, or a function returning them}) as a store.

  Args:
    out_dir: the store's directory, local or `gs://` (written locally, then
      copied). An existing store there is an error: nothing is overwritten.
    splits: {split name: {feature: array [n, ...]}}, features alike across
      splits; a callable is called when its split is written.
    encodings: {feature: "raw" | "png" | "jpeg"}; default raw (exact).
    shard_bytes: about this many bytes of rows per shard.
    labels: the class order (written as labels.json), if the task has one.
    description: what the store was written from (e.g. the gin config).
    prepared: files beside the store that a run copies into its model dir
      (what the task's `prepare` wrote there: labels.json, a vocabulary).
    chunk_rows: rows serialized at a time.

  Returns:
    `out_dir`.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  encodings = dict(encodings or {})
  if tf.io.gfile.exists(os.path.join(out_dir, METADATA)):
    raise InputDataError(f"{out_dir} already holds a record store; remove it or "
                         "choose another --out.")
  remote = "://" in out_dir
  local_dir = tempfile.mkdtemp(prefix="tfadv_store_") if remote else out_dir
  os.makedirs(local_dir, exist_ok=True)
  metadata = {"format": FORMAT, "description": description, "features": None,
              "splits": {}, "prepared": sorted(set(prepared or []) | (
                  {LABELS} if labels is not None else set()))}
  for split, arrays in splits.items():
    arrays = arrays() if callable(arrays) else arrays
    names = sorted(arrays)
    n = len(arrays[names[0]])
    features = {k: {"dtype": np.asarray(arrays[k]).dtype.name,
                    "shape": list(np.shape(arrays[k])[1:]),
                    "encoding": encodings.get(k, "raw")} for k in names}
    for k, spec in features.items():
      if spec["encoding"] not in ENCODINGS:
        raise ValueError(f"write_store: encoding {spec['encoding']!r} of {k}; "
                         f"expected one of {ENCODINGS}.")
      if spec["encoding"] != "raw" and (spec["dtype"] != "uint8" or len(spec["shape"]) != 3):
        raise ValueError(f"write_store: {k} is {spec['dtype']} {spec['shape']}; "
                         "png/jpeg encode uint8 images [H, W, C].")
    if metadata["features"] is None:
      metadata["features"] = features
    elif metadata["features"] != features:
      raise ValueError(f"write_store: split {split}'s features {features} differ "
                       f"from the first split's {metadata['features']}.")
    row_bytes = sum(np.asarray(arrays[k][:1]).nbytes for k in names) or 1
    rows_per_shard = max(1, shard_bytes // row_bytes)
    num_shards = max(1, -(-n // rows_per_shard))
    shards = []
    for shard in range(num_shards):
      begin, end = shard * n // num_shards, (shard + 1) * n // num_shards
      name = _shard_name(split, shard, num_shards)
      writer = array_record_module.ArrayRecordWriter(
          os.path.join(local_dir, name), "group_size:1")
      for start in range(begin, end, chunk_rows):
        stop = min(end, start + chunk_rows)
        for i in range(start, stop):
          example = tf.train.Example(features=tf.train.Features(feature={
              k: tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[_encode(arrays[k][i], features[k]["encoding"])]))
              for k in names}))
          writer.write(example.SerializeToString())
      writer.close()
      shards.append({"file": name, "num_examples": end - begin})
    metadata["splits"][split] = {"num_examples": n, "shards": shards}
  if labels is not None:
    with open(os.path.join(local_dir, LABELS), "w") as f:
      json.dump({"labels": list(labels)}, f, ensure_ascii=False, indent=1)
  with open(os.path.join(local_dir, METADATA), "w") as f:  # last: marks it complete
    json.dump(metadata, f, indent=1)
  if remote:
    tf.io.gfile.makedirs(out_dir)
    for name in sorted(os.listdir(local_dir), key=lambda x: x == METADATA):
      tf.io.gfile.copy(os.path.join(local_dir, name), os.path.join(out_dir, name))
    shutil.rmtree(local_dir)
  return out_dir


def copy_prepared(store: str, model_dir: str) -> None:
  """Copies what the task's `prepare` wrote beside the store (labels.json, a
  vocabulary) into `model_dir`, where missing, so the run labels and
  tokenizes as the rows were written."""
  metadata = read_metadata(store)
  tf.io.gfile.makedirs(model_dir)
  for name in metadata.get("prepared", []):
    target = os.path.join(model_dir, name)
    if not tf.io.gfile.exists(target):
      tf.io.gfile.copy(os.path.join(store, name), target)


def read_metadata(store: str) -> dict:
  """The store's metadata.json; a missing or foreign store is a one-line error."""
  path = os.path.join(store, METADATA)
  if not tf.io.gfile.exists(path):
    raise MissingInputError(f"No record store at {store} (no {METADATA}); {WRITE_HINT}.")
  with tf.io.gfile.GFile(path) as f:
    try:
      metadata = json.load(f)
    except json.JSONDecodeError as e:
      raise InputDataError(f"{path}: not JSON ({e}); write the store again.") from None
  if metadata.get("format") != FORMAT:
    raise InputDataError(f"{path}: format {metadata.get('format')!r}, expected "
                         f"{FORMAT!r}; write the store again with this tfadv.")
  return metadata


def store_labels(store: str) -> Optional[List[str]]:
  """The class order the store's rows were labelled in, if it has one."""
  path = os.path.join(store, LABELS)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)["labels"]


class RecordSource(PythonReadSource):
  """One split of a record store, read by batched random access.

  Each `read` maps its indices to (shard, row), reads each shard's rows in
  one ArrayRecord call, and decodes in graph. Readers are opened per thread
  (the pipeline's parallel map calls from several), with no read-ahead: the
  pipeline's own prefetch keeps input off the critical path.

  Args:
    store: the store's directory (local, or a mounted bucket).
    split: "train", "validation" or "eval".
  """

  def __init__(self, store: str, split: str):
    if store.startswith("gs://"):
      raise MissingInputError(
          f"Experiment.record_store={store}: ArrayRecord reads local files; copy "
          f"the store to local disk (`gcloud storage cp -r {store} DIR`) or mount "
          "the bucket (gcsfuse) and pass that path.")
    self.store, self.split = store, split
    metadata = read_metadata(store)
    if split not in metadata["splits"]:
      raise MissingInputError(f"Record store {store} has no split {split!r} (it has "
                              f"{sorted(metadata['splits'])}); {WRITE_HINT}.")
    info = metadata["splits"][split]
    self.num_examples = int(info["num_examples"])
    self._files = [os.path.join(store, s["file"]) for s in info["shards"]]
    for path in self._files:
      if not tf.io.gfile.exists(path):
        raise MissingInputError(f"Record store {store}: shard {path} is missing; "
                                "copy the whole store, or write it again.")
    self._starts = np.cumsum([0] + [s["num_examples"] for s in info["shards"]])[:-1]
    self.features = metadata["features"]
    self.specs = {}
    for name, spec in self.features.items():
      self.specs[name] = tf.TensorSpec(spec["shape"], tf.as_dtype(spec["dtype"]))
    self._local = threading.local()

  def _readers(self):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = [array_record_module.ArrayRecordReader(
          path, "readahead_buffer_size:0") for path in self._files]
      self._local.readers = readers
    return readers

  def _read_serialized(self, indices):
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"{self.store}:{self.split}: rows {indices.min()}..{indices.max()} "
                       f"outside 0..{self.num_examples - 1}.")
    shards = np.searchsorted(self._starts, indices, side="right") - 1
    out = [None] * len(indices)
    readers = self._readers()
    for shard in np.unique(shards):
      where = np.nonzero(shards == shard)[0]
      rows = readers[shard].read((indices[where] - self._starts[shard]).tolist())
      for position, row in zip(where, rows):
        out[position] = row
    return out

  def _decode(self, serialized):
    parsed = tf.io.parse_example(serialized, {
        name: tf.io.FixedLenFeature([], tf.string) for name in self.features})
    batch = {}
    for name, spec in self.features.items():
      tensor_spec = self.specs[name]
      if spec["encoding"] == "raw":
        flat = tf.io.decode_raw(parsed[name], tensor_spec.dtype)
        batch[name] = tf.reshape(flat, tf.concat(
            [tf.shape(serialized), tf.constant(spec["shape"], tf.int32)], 0))
        batch[name].set_shape(serialized.shape.concatenate(tensor_spec.shape))
      else:
        batch[name] = tf.map_fn(
            lambda s, shape=tensor_spec.shape: tf.ensure_shape(
                tf.io.decode_image(s, channels=shape[-1], expand_animations=False), shape),
            parsed[name], fn_output_signature=tensor_spec)
    return batch
