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

Two layouts (`metadata.json`'s "layout"):

- "array_record" (default): ArrayRecord shards, read through its Python
  reader inside the input pipeline (`tf.numpy_function`);
- "fixed": rows of raw features (and at most one variable-length string,
  an encoded image) in small block files, `<split>-b00000012.bin` of about
  64 KB (one row each for ImageNet's JPEGs), each read whole by TensorFlow's
  own `tf.io.read_file` and sliced at the row's offsets. No Python runs in
  the input pipeline, so it works where the pipeline runs without Python
  (each host of a TPU pod slice under TensorFlow's single-client model,
  tensorflow/tensorflow#24099), and it reads `gs://` directly.
  (`FixedLengthRecordDataset` cannot serve: it reaches a row by reading
  every byte before it.)

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

import io
import json
import os
import shutil
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from tfadv.data.sources import (ArraySource, ExampleSource, PythonReadSource, decode_images,
                                decode_raw)
from tfadv.errors import InputDataError, MissingInputError, SettingError

FORMAT = "tfadv-records-1"
METADATA = "metadata.json"
LABELS = "labels.json"
ENCODINGS = ("raw", "png", "jpeg", "bytes")
WRITE_HINT = "write one with `python -m tfadv.tools.write_records --gin_file=... --out=DIR`"


LAYOUTS = ("array_record", "fixed")


def _shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def _encode(value, encoding: str) -> bytes:
  if encoding == "bytes":  # a variable-length string (an encoded image), as it is
    return bytes(value)
  if encoding == "raw":
    return np.ascontiguousarray(value).tobytes()
  if encoding == "png":
    return tf.io.encode_png(value).numpy()
  return tf.io.encode_jpeg(value, quality=95).numpy()


def _nbytes(column) -> int:
  if column.dtype == object:
    return sum(len(bytes(v)) for v in column)
  return column.nbytes


def _rows_of(value, encodings):
  """(rows, features, chunk(start, stop) -> {name: numpy}) of arrays or a source."""
  if isinstance(value, ArraySource):
    value = value.arrays
  if isinstance(value, ExampleSource):  # streamed in chunks: never held whole
    features = {k: {"dtype": "string" if spec.dtype == tf.string else spec.dtype.name,
                    "shape": list(spec.shape),
                    "encoding": "bytes" if spec.dtype == tf.string else encodings.get(k, "raw")}
                for k, spec in value.specs.items()}

    def chunk(start, stop):
      batch = value.read(tf.range(start, stop, dtype=tf.int64))
      return {k: v.numpy() for k, v in batch.items()}
    return value.num_examples, features, chunk
  features = {k: {"dtype": np.asarray(v).dtype.name, "shape": list(np.shape(v)[1:]),
                  "encoding": encodings.get(k, "raw")} for k, v in value.items()}
  n = len(next(iter(value.values())))
  return n, features, lambda start, stop: {k: v[start:stop] for k, v in value.items()}


def _block_name(split: str, block: int) -> str:
  return f"{split}-b{block:08d}.bin"


def _write_blocks(local_dir, split, n, chunk, order, features, block_bytes, chunk_rows):
  """Writes a split in the fixed layout; returns its metadata entry."""
  variable = features[order[-1]]["encoding"] == "bytes"
  begins, ends = np.zeros(n, np.int64), np.zeros(n, np.int64)
  block, buffer, position, rows_per_block = 0, [], 0, None
  for start in range(0, n, chunk_rows):
    rows = chunk(start, min(n, start + chunk_rows))
    if rows_per_block is None:  # from the first rows' size (variable rows: their mean)
      first = min(len(rows[order[0]]), 64)
      mean_row = max(1, sum(_nbytes(rows[k][:first]) for k in order) // max(1, first))
      rows_per_block = max(1, block_bytes // mean_row)
    for j in range(len(rows[order[0]])):
      i = start + j
      row = b"".join(_encode(rows[k][j], features[k]["encoding"]) for k in order)
      begins[i], ends[i] = position, position + len(row)
      buffer.append(row)
      position += len(row)
      if (i + 1) % rows_per_block == 0 or i == n - 1:
        with open(os.path.join(local_dir, _block_name(split, block)), "wb") as f:
          f.write(b"".join(buffer))
        block, buffer, position = block + 1, [], 0
  info = {"num_examples": n, "rows_per_block": rows_per_block or 1, "blocks": block}
  if variable:
    info["offsets"] = f"{split}.offsets.npy"
    np.save(os.path.join(local_dir, info["offsets"]), np.stack([begins, ends], 1))
  return info


def write_store(out_dir: str,
                splits: Dict[str, Union[Dict[str, np.ndarray], Callable[[], Dict[str, np.ndarray]]]],
                *, encodings: Optional[Dict[str, str]] = None,
                shard_bytes: int = 256 << 20, labels: Optional[List[str]] = None,
                description: str = "", prepared: Optional[List[str]] = None,
                chunk_rows: int = 4096, layout: str = "array_record",
                block_bytes: int = 64 << 10, signature: Optional[dict] = None) -> str:
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
    layout: "array_record" or "fixed" (raw features and at most one
      variable-length string; see the module docstring).
    block_bytes: with the fixed layout, about this many bytes per block file
      (at least one row).
    signature: the settings the rows follow from (`Task.store_signature`),
      which a run on the store checks (`check_signature`).

  Returns:
    `out_dir`.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  encodings = dict(encodings or {})
  if layout not in LAYOUTS:
    raise ValueError(f"write_store: layout {layout!r}; expected one of {LAYOUTS}.")
  check_new_store(out_dir)
  remote = "://" in out_dir
  local_dir = tempfile.mkdtemp(prefix="tfadv_store_") if remote else out_dir
  os.makedirs(local_dir, exist_ok=True)
  metadata = {"format": FORMAT, "layout": layout, "description": description,
              "signature": dict(signature or {}),
              "features": None,
              "splits": {}, "prepared": sorted(set(prepared or []) | (
                  {LABELS} if labels is not None else set()))}
  for split, value in splits.items():
    n, features, chunk = _rows_of(value() if callable(value) else value, encodings)
    names = sorted(features)
    for k, spec in features.items():
      if spec["encoding"] not in ENCODINGS:
        raise ValueError(f"write_store: encoding {spec['encoding']!r} of {k}; "
                         f"expected one of {ENCODINGS}.")
      if spec["encoding"] in ("png", "jpeg") and (
          spec["dtype"] != "uint8" or len(spec["shape"]) != 3):
        raise ValueError(f"write_store: {k} is {spec['dtype']} {spec['shape']}; "
                         "png/jpeg encode uint8 images [H, W, C].")
    if layout == "fixed" and any(e not in ("raw", "bytes") for e in
                                 (f["encoding"] for f in features.values())):
      raise ValueError("write_store: the fixed layout stores raw features (and at "
                       "most one variable-length string); drop the png/jpeg encodings "
                       "or use layout='array_record'.")
    variable = [k for k in names if features[k]["encoding"] == "bytes"]
    if layout == "fixed" and len(variable) > 1:
      raise ValueError(f"write_store: the fixed layout holds one variable-length "
                       f"feature, not {variable}.")
    if metadata["features"] is None:
      metadata["features"] = features
    elif metadata["features"] != features:
      raise ValueError(f"write_store: split {split}'s features {features} differ "
                       f"from the first split's {metadata['features']}.")
    first = chunk(0, min(n, 64))
    row_bytes = max(1, sum(_nbytes(first[k]) for k in names) // max(1, min(n, 64)))
    # Fixed features first (sorted), the variable-length one last.
    order = [k for k in names if k not in variable] + variable
    if layout == "fixed":
      metadata["splits"][split] = _write_blocks(local_dir, split, n, chunk, order,
                                                features, block_bytes, chunk_rows)
      continue
    rows_per_shard = max(1, shard_bytes // row_bytes)
    num_shards = max(1, -(-n // rows_per_shard))
    shards = []
    for shard in range(num_shards):
      begin, end = shard * n // num_shards, (shard + 1) * n // num_shards
      name = _shard_name(split, shard, num_shards)
      writer = array_record_module.ArrayRecordWriter(
          os.path.join(local_dir, name), "group_size:1")
      for start in range(begin, end, chunk_rows):
        rows = chunk(start, min(end, start + chunk_rows))
        for i in range(len(rows[names[0]])):
          example = tf.train.Example(features=tf.train.Features(feature={
              k: tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[_encode(rows[k][i], features[k]["encoding"])]))
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


def check_new_store(out_dir: str) -> None:
  """Refuses (one line) to write where a store already is: none is overwritten."""
  if tf.io.gfile.exists(os.path.join(out_dir, METADATA)):
    raise InputDataError(f"{out_dir} already holds a record store; remove it or "
                         "choose another --out.")


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


def check_signature(store: str, signature: dict) -> None:
  """A run's task settings against those its store was written with: a
  setting that differs (a sequence length, a validation carve, a dataset's
  seed) is a one-line `SettingError`, not rows silently read as if it did
  not. A store written before signatures were kept is not checked."""
  written = read_metadata(store).get("signature") or {}
  for key in sorted(set(written) | set(signature)):
    if key in written and key in signature and written[key] != signature[key]:
      raise SettingError(
          f"Experiment.record_store = {store!r} was written with {key} = {written[key]!r}, "
          f"this run has {signature[key]!r}: write a store for this config "
          "(python -m tfadv.tools.write_records) or bind the store's value.")


def store_labels(store: str) -> Optional[List[str]]:
  """The class order the store's rows were labelled in, if it has one."""
  path = os.path.join(store, LABELS)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)["labels"]


def RecordSource(store: str, split: str):  # pylint: disable=invalid-name
  """One split of a record store, read by its layout's reader
  (`ArrayRecordSource` or `FixedRecordSource`)."""
  layout = read_metadata(store).get("layout", "array_record")
  return (FixedRecordSource if layout == "fixed" else ArrayRecordSource)(store, split)


def _split_metadata(store: str, split: str) -> Tuple[dict, dict, Dict[str, tf.TensorSpec]]:
  """(the store's metadata, the split's entry, {feature: TensorSpec})."""
  metadata = read_metadata(store)
  if split not in metadata["splits"]:
    raise MissingInputError(f"Record store {store} has no split {split!r} (it has "
                            f"{sorted(metadata['splits'])}); {WRITE_HINT}.")
  specs = {name: tf.TensorSpec(spec["shape"], tf.as_dtype(spec["dtype"]))
           for name, spec in metadata["features"].items()}
  return metadata, metadata["splits"][split], specs


def _shard_files(store: str, info: dict):
  """The split's shard paths (each checked) and each shard's first row."""
  files = [os.path.join(store, s["file"]) for s in info["shards"]]
  for path in files:
    if not tf.io.gfile.exists(path):
      raise MissingInputError(f"Record store {store}: shard {path} is missing; "
                              "copy the whole store, or write it again.")
  starts = np.cumsum([0] + [s["num_examples"] for s in info["shards"]])
  return files, starts


class ArrayRecordSource(PythonReadSource):
  """One split of an "array_record" store, read by batched random access.

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
          f"the store to local disk (`gcloud storage cp -r {store} DIR`), mount "
          "the bucket (gcsfuse) and pass that path, or write the store with "
          "--layout=fixed (read from gs:// directly).")
    self.store, self.split = store, split
    metadata, info, self.specs = _split_metadata(store, split)
    self.num_examples = int(info["num_examples"])
    self._files, starts = _shard_files(store, info)
    self._starts = starts[:-1]
    self.features = metadata["features"]
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
      if spec["encoding"] == "bytes":  # kept encoded, for the task's decoding
        batch[name] = parsed[name]
      elif spec["encoding"] == "raw":
        batch[name] = decode_raw(parsed[name], self.specs[name])
      else:
        batch[name] = decode_images(parsed[name], self.specs[name])
    return batch


class FixedRecordSource(ExampleSource):
  """One split of a "fixed" store, read in graph (no Python) from local disk
  or `gs://`: row i is in block i // rows_per_block, read whole with
  `tf.io.read_file` (blocks are small) and sliced at the row's offsets, then
  split into its features (`tf.io.decode_raw`, little-endian as written).

  A row is its fixed-size features' raw bytes (sorted by name), then at most
  one variable-length string (an encoded image). Fixed-size rows sit at
  (i mod rows_per_block) × row size; variable ones at the offsets index
  (`<split>.offsets.npy`: begin and end per row, 20 MB for ImageNet's 1.28 M
  rows), loaded once and carried by the input graph. `read` reads its rows
  `parallel_reads` at a time.
  """

  def __init__(self, store: str, split: str, parallel_reads: int = 16):
    self.store, self.split = store, split
    metadata, info, self.specs = _split_metadata(store, split)
    self.num_examples = int(info["num_examples"])
    self.rows_per_block = int(info["rows_per_block"])
    last = os.path.join(store, _block_name(split, int(info["blocks"]) - 1))
    if not tf.io.gfile.exists(last):
      raise MissingInputError(f"Record store {store}: block {last} is missing; copy "
                              "the whole store, or write it again.")
    self.features = metadata["features"]
    self._variable = [k for k in sorted(self.features)
                      if self.features[k]["encoding"] == "bytes"]
    self._fixed = [k for k in sorted(self.features) if k not in self._variable]
    self._sizes = [int(np.prod(self.specs[k].shape, dtype=np.int64)) *
                   self.specs[k].dtype.size for k in self._fixed]
    self._row_bytes = sum(self._sizes)  # fixed-size rows: their features' bytes
    self._offsets = None
    if "offsets" in info:
      with tf.io.gfile.GFile(os.path.join(store, info["offsets"]), "rb") as f:
        self._offsets = np.load(io.BytesIO(f.read()))
    self._prefix = os.path.join(store, f"{split}-b")
    self.parallel_reads = parallel_reads
    self._constant = None

  def _row(self, index):
    block = index // self.rows_per_block
    path = tf.strings.join([self._prefix, tf.strings.as_string(block, width=8, fill="0"),
                            ".bin"])
    data = tf.io.read_file(path)
    if self._offsets is None:
      begin = (index % self.rows_per_block) * self._row_bytes
      length = tf.constant(self._row_bytes, tf.int64)
    else:
      begin, length = self._constant[index, 0], self._constant[index, 1] - self._constant[index, 0]
    return tf.strings.substr(data, begin, length)

  def read(self, indices):
    if self._constant is None and self._offsets is not None:
      with tf.init_scope():  # an eager constant, captured by every graph that reads
        self._constant = tf.constant(self._offsets)
    indices = tf.convert_to_tensor(indices, tf.int64)
    checks = [tf.debugging.assert_less(
        indices, tf.constant(self.num_examples, tf.int64),
        message=f"{self.store}:{self.split}: rows outside 0..{self.num_examples - 1}"),
              tf.debugging.assert_non_negative(indices)]
    with tf.control_dependencies(checks):
      indices = tf.identity(indices)
    rows = tf.map_fn(self._row, indices, fn_output_signature=tf.string,
                     parallel_iterations=self.parallel_reads)
    batch, offset = {}, 0
    for name, size in zip(self._fixed, self._sizes):
      batch[name] = decode_raw(tf.strings.substr(rows, offset, size), self.specs[name])
      offset += size
    for name in self._variable:
      batch[name] = tf.strings.substr(rows, tf.fill(tf.shape(rows), offset),
                                      tf.strings.length(rows) - offset)
    return batch
