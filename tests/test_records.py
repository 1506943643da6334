"""Record stores: rows as written, the same batches and weights as in memory,
exact resume, disjoint rows per host, memory bounded by what a step reads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import REPO, write_tiny_fashion_idx
from tfadv.data import pipeline, records
from tfadv.data.sources import ArraySource
from tfadv.errors import InputDataError, MissingInputError, SettingError

PLAIN = os.path.join(REPO, "configs", "fashion_mnist_plain.gin")


def random_arrays(n=37, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, 6, 5, 3)).astype(np.uint8),
          "token_ids": rng.randint(-5, 30000, (n, 7)).astype(np.int32),
          "weight": rng.randn(n, 2).astype(np.float32),
          "label": rng.randint(0, 9, n).astype(np.int64)}


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_tiny_fashion_idx(tmp_path_factory.mktemp("idx"), num_train=256)


@pytest.mark.parametrize("layout,encoding", [("array_record", "raw"), ("array_record", "png"),
                                             ("fixed", "raw")])
def test_store_rows_equal_the_rows_written_in_any_order_across_shards(tmp_path, layout,
                                                                    encoding):
  arrays = random_arrays()
  records.write_store(str(tmp_path / "s"), {"train": arrays, "eval": random_arrays(5, 1)},
                      encodings={"image": encoding}, shard_bytes=300, labels=["a", "b"],
                      layout=layout, block_bytes=300)
  metadata = records.read_metadata(str(tmp_path / "s"))
  assert metadata["layout"] == layout
  pieces = metadata["splits"]["train"].get("shards") or range(
      metadata["splits"]["train"]["blocks"])
  assert len(pieces) > 3  # rows spread over shards (blocks)
  assert metadata["prepared"] == ["labels.json"]
  source = records.RecordSource(str(tmp_path / "s"), "train")
  assert source.num_examples == 37
  indices = np.random.RandomState(1).randint(0, 37, 64)  # repeats, any order
  got = source.read(tf.constant(indices, tf.int64))
  for name, array in arrays.items():
    assert got[name].dtype == tf.as_dtype(array.dtype), name
    np.testing.assert_array_equal(got[name].numpy(), array[indices], err_msg=name)
  head = source.head(4)
  for name, array in arrays.items():
    np.testing.assert_array_equal(head[name], array[:4])
  assert records.store_labels(str(tmp_path / "s")) == ["a", "b"]


class _StreamedStrings(records.ExampleSource):
  """A streamed source (never held whole) with a variable-length string column,
  as TFDS's encoded JPEGs are; it holds callers to int64 indices."""

  def __init__(self, blobs, labels, weights):
    self.blobs, self.labels, self.weights = blobs, labels, weights
    self.num_examples = len(blobs)
    self.specs = {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64),
                  "weight": tf.TensorSpec([2], tf.float32)}

  def read(self, indices):
    assert indices.dtype == tf.int64, indices.dtype
    return {"image": tf.gather(tf.constant(self.blobs.tolist()), indices),
            "label": tf.gather(self.labels, indices), "weight": tf.gather(self.weights, indices)}


@pytest.mark.parametrize("layout", ["array_record", "fixed"])
def test_a_streamed_string_column_is_stored_as_its_bytes_in_blocks_of_about_block_bytes(
    tmp_path, layout):
  rng = np.random.RandomState(2)
  n = 40
  blobs = np.array([bytes(rng.randint(0, 256, rng.randint(1, 60)).astype(np.uint8))
                    for _ in range(n)], dtype=object)
  labels = rng.randint(0, 9, n).astype(np.int64)
  weights = rng.randn(n, 2).astype(np.float32)
  records.write_store(str(tmp_path / "s"), {"train": _StreamedStrings(blobs, labels, weights)},
                      layout=layout, chunk_rows=7, block_bytes=240)
  metadata = records.read_metadata(str(tmp_path / "s"))
  assert metadata["format"] == "tfadv-records-1"  # what a later version must still read
  assert metadata["features"]["image"] == {"dtype": "string", "shape": [], "encoding": "bytes"}
  assert metadata["features"]["label"] == {"dtype": "int64", "shape": [], "encoding": "raw"}
  source = records.RecordSource(str(tmp_path / "s"), "train")
  indices = np.random.RandomState(3).randint(0, n, 50)
  got = source.read(tf.constant(indices, tf.int64))
  assert got["image"].numpy().tolist() == blobs[indices].tolist()
  np.testing.assert_array_equal(got["label"].numpy(), labels[indices])
  np.testing.assert_array_equal(got["weight"].numpy(), weights[indices])
  if layout == "fixed":
    # By hand: the first chunk's 7 rows average 338 // 7 = 48 whole bytes
    # (string, int64 label, 2 float32); a block holds block_bytes' worth.
    mean_row = sum(len(b) + 8 + 8 for b in blobs[:7]) // 7
    split = metadata["splits"]["train"]
    assert mean_row == 48 and split["rows_per_block"] == 240 // 48 == 5
    assert split["blocks"] == -(-n // split["rows_per_block"])
    sizes = [os.path.getsize(tmp_path / "s" / f"train-b{b:08d}.bin")
             for b in range(split["blocks"])]
    assert sum(sizes) == sum(len(b) + 16 for b in blobs)


def test_a_remote_store_is_written_locally_then_copied_with_its_metadata_last(monkeypatch):
  # TensorFlow's in-memory file system stands in for gs://: the fixed layout
  # reads it with TensorFlow ops alone. A copy that breaks midway leaves no
  # metadata.json, so the half-copied store reads as missing, not as a store.
  arrays = random_arrays(9)
  records.write_store("ram://tfadv-test/store", {"train": arrays}, layout="fixed",
                      block_bytes=300, labels=["a"])
  assert not os.path.exists("ram:")  # no local directory named after the URL
  source = records.RecordSource("ram://tfadv-test/store", "train")
  got = source.read(tf.constant([8, 0, 3], tf.int64))
  np.testing.assert_array_equal(got["token_ids"].numpy(), arrays["token_ids"][[8, 0, 3]])
  copied = []

  def copy_then_break(source_path, target, **kwargs):
    if len(copied) == 3:
      raise OSError("connection reset")
    copied.append(os.path.basename(target))
    tf.io.gfile.GFile(target, "wb").write(tf.io.gfile.GFile(source_path, "rb").read())
  monkeypatch.setattr(tf.io.gfile, "copy", copy_then_break)
  with pytest.raises(OSError, match="connection reset"):
    records.write_store("ram://tfadv-test/broken", {"train": arrays}, layout="fixed",
                        block_bytes=300)
  assert copied and "metadata.json" not in copied
  with pytest.raises(MissingInputError):
    records.RecordSource("ram://tfadv-test/broken", "train")


def test_a_store_refuses_what_its_encodings_and_layout_cannot_hold(tmp_path):
  arrays = random_arrays(3)
  with pytest.raises(ValueError, match="png/jpeg encode uint8 images"):
    records.write_store(str(tmp_path / "a"), {"train": {"x": arrays["weight"][:, :, None, None]}},
                        encodings={"x": "png"})
  with pytest.raises(ValueError, match="png/jpeg encode uint8 images"):
    records.write_store(str(tmp_path / "b"), {"train": {"x": arrays["token_ids"].astype(np.uint8)}},
                        encodings={"x": "jpeg"})
  blobs = np.array([b"a", b"bc", b"def"], dtype=object)
  with pytest.raises(ValueError, match="holds one variable-length feature"):
    records.write_store(str(tmp_path / "c"), {"train": {"x": blobs, "y": blobs}},
                        encodings={"x": "bytes", "y": "bytes"}, layout="fixed")
  records.write_store(str(tmp_path / "d"), {"train": {"x": blobs}}, encodings={"x": "bytes"},
                      layout="fixed")  # one is fine


@pytest.mark.parametrize("layout", ["array_record", "fixed"])
def test_pipeline_reads_the_same_batches_from_a_store_as_from_memory(tmp_path, mirrored, layout):
  arrays = random_arrays(50)
  records.write_store(str(tmp_path / "s"), {"train": arrays}, shard_bytes=500, layout=layout,
                      block_bytes=500)
  source = records.RecordSource(str(tmp_path / "s"), "train")
  for strategy in (tf.distribute.get_strategy(), mirrored):
    for shuffle in (True, False):
      kwargs = dict(shuffle=shuffle, seed=4, start_step=3 if shuffle else 0, num_steps=4,
                    repeats_per_batch=2 if shuffle else 1)
      memory = list(pipeline.distributed_dataset(strategy, arrays, 16, **kwargs))
      stored = list(pipeline.distributed_dataset(strategy, source, 16, **kwargs))
      assert len(memory) == len(stored) == 4
      for a, b in zip(memory, stored):
        for key in a:
          for x, y in zip(strategy.experimental_local_results(a[key]),
                          strategy.experimental_local_results(b[key])):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=key)


class _LoggingSource(ArraySource):
  """An in-memory source that records every row it is asked for."""

  def __init__(self, arrays, log):
    super().__init__(arrays)
    self.log = log

  def read(self, indices):
    def note(values):
      self.log.extend(values.tolist())
      return values
    indices = tf.numpy_function(note, [indices], tf.int64, stateful=True)
    indices.set_shape([None])
    return super().read(indices)


@pytest.mark.parametrize("pipelines,replicas", [(2, 2), (2, 4), (4, 4)])
def test_each_host_reads_only_its_replicas_rows_and_together_the_one_host_batch(
    pipelines, replicas):
  arrays = random_arrays(40)
  steps, batch = 3, 16

  def rows_read(num_pipelines, pipeline_id):
    log = []
    context = tf.distribute.InputContext(num_pipelines, pipeline_id, replicas)
    fn = pipeline.input_fn(_LoggingSource(arrays, log), batch, shuffle=True, seed=2,
                           start_step=5, num_steps=steps)
    batches = [b["example_index"].numpy() for b in fn(context)]
    return log, np.concatenate(batches)

  one_log, one = rows_read(1, 0)
  assert sorted(one_log) == sorted(one.tolist()) and len(one) == steps * batch
  parts = [rows_read(pipelines, i) for i in range(pipelines)]
  for log, delivered in parts:
    assert sorted(log) == sorted(delivered.tolist())  # read = delivered, nothing more
    assert len(log) == steps * batch // pipelines
  # Step by step, the hosts' rows (in host order) are the one-host batch.
  per_step = batch // pipelines
  for step in range(steps):
    joined = np.concatenate([d[step * per_step:(step + 1) * per_step] for _, d in parts])
    np.testing.assert_array_equal(joined, one[step * batch:(step + 1) * batch])


def write_records_command(out, idx_dir, *extra, gin_file=PLAIN):
  """The command line; `extra` holds gin bindings and (leading "--") flags."""
  flags = [e for e in extra if e.startswith("--")]
  bindings = [e for e in extra if not e.startswith("--")]
  return ([sys.executable, "-m", "tfadv.tools.write_records", f"--gin_file={gin_file}",
           f"--out={out}", *flags]
          + [f"--gin_param={p}" for p in builders.tiny_fashion_bindings(idx_dir) + bindings])


def run(command, **kwargs):
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=600, check=False, **kwargs)


def checkpoint_values(model_dir):
  reader = tf.train.load_checkpoint(str(model_dir))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith("train_seconds") and "OBJECT_CONFIG" not in k
          and not k.startswith("_CHECKPOINTABLE")}


@pytest.fixture(scope="module")
def fashion_store(tmp_path_factory, idx_dir):
  out = tmp_path_factory.mktemp("store") / "fashion"
  written = run(write_records_command(out, idx_dir))
  assert written.returncode == 0, written.stderr[-2000:]
  assert "train: 256 rows" in written.stdout and "eval: 40 rows" in written.stdout
  return str(out)


@pytest.mark.slow
def test_training_on_a_store_gives_bit_identical_weights_to_memory(tmp_path, idx_dir,
                                                                   fashion_store):
  params = ["Experiment.train_epochs = None", "Experiment.train_steps = 24"]
  memory = run(builders.main_command(PLAIN, tmp_path / "memory", idx_dir, *params))
  # The store run cannot read the IDX files: a data dir that does not exist.
  stored = run(builders.main_command(
      PLAIN, tmp_path / "stored", "/nonexistent", *params,
      f"Experiment.record_store = '{fashion_store}'"))
  assert memory.returncode == 0, memory.stderr[-2000:]
  assert stored.returncode == 0, stored.stderr[-2000:]
  a, b = checkpoint_values(tmp_path / "memory"), checkpoint_values(tmp_path / "stored")
  assert a.keys() == b.keys() and len(a) > 5
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert json.load(open(tmp_path / "stored" / "labels.json"))["labels"] == json.load(
      open(tmp_path / "memory" / "labels.json"))["labels"]


@pytest.mark.slow
def test_a_text_task_trains_on_its_store_to_the_same_weights(fewclue_dir, tmp_path):
  from tfadv import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from tfadv.tools import write_records  # pylint: disable=g-import-not-at-top
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=6, steps_per_loop=3,
                                    checkpoint_every=6)
  builders.configure(bindings)
  task = experiment_lib.Experiment().task  # pylint: disable=no-value-for-parameter
  write_records.write(task, str(tmp_path / "store"))
  metadata = records.read_metadata(str(tmp_path / "store"))
  assert {"labels.json", "vocab.txt"} <= set(metadata["prepared"]), metadata["prepared"]
  # Writing another dataset there is refused, saying so, before its `prepare`
  # reads or writes anything in the store.
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()}
  builders.configure(bindings + [f"ClueDataset.data_dir = '{fewclue_dir}/iflytek'"])
  other = experiment_lib.Experiment().task  # pylint: disable=no-value-for-parameter
  with pytest.raises(InputDataError, match="already holds a record store"):
    write_records.write(other, str(tmp_path / "store"))
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()} == before
  builders.configure(bindings)
  strategy = tf.distribute.get_strategy()
  memory = builders.run("train", tmp_path / "memory", strategy, bindings)
  stored = builders.run("train", tmp_path / "stored", strategy, bindings + [
      f"Experiment.record_store = '{tmp_path / 'store'}'",
      f"ClueDataset.data_dir = '{tmp_path / 'absent'}'"])
  for a, b in zip(builders.weights(memory["experiment"].model),
                  builders.weights(stored["experiment"].model)):
    np.testing.assert_array_equal(a, b)
  signature = records.read_metadata(str(tmp_path / "store"))["signature"]
  assert signature["TextClassificationTask.sequence_length"] == 32
  assert signature["ClueDataset.validation_fraction"] == 0.0
  # A run whose rows would differ from the store's is stopped before training.
  for binding, key in (("TextClassificationTask.sequence_length = 48", "sequence_length"),
                       ("ClueDataset.validation_fraction = 0.15", "validation_fraction")):
    with pytest.raises(SettingError, match=rf"was written with \S*{key} = .*this run has"):
      builders.run("train", tmp_path / f"other_{key}", strategy, bindings + [
          f"Experiment.record_store = '{tmp_path / 'store'}'", binding])
    assert not (tmp_path / f"other_{key}" / "checkpoint").exists()


def test_a_missing_or_foreign_store_stops_with_one_line_naming_the_fix(tmp_path, idx_dir):
  result = run(builders.main_command(PLAIN, tmp_path / "run", idx_dir,
                                     f"Experiment.record_store = '{tmp_path / 'none'}'"))
  assert result.returncode == 2
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("tfadv: No record store at") and "write_records" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoint")
  records.write_store(str(tmp_path / "s"), {"train": random_arrays(3)})
  with pytest.raises((IndexError, tf.errors.OpError), match="outside 0..2"):  # no wrong row
    records.RecordSource(str(tmp_path / "s"), "train").read(tf.constant([1, 3], tf.int64))
  with pytest.raises(MissingInputError, match="has no split 'eval'"):
    records.RecordSource(str(tmp_path / "s"), "eval")
  with pytest.raises(InputDataError, match="already holds a record store"):
    records.write_store(str(tmp_path / "s"), {"train": random_arrays(3)})
  with pytest.raises(MissingInputError, match="gcloud storage cp"):
    records.ArrayRecordSource("gs://bucket/store", "train")  # before any network
  os.remove(next(p for p in (tmp_path / "s").iterdir() if p.suffix == ".array_record"))
  with pytest.raises(MissingInputError, match="is missing"):
    records.RecordSource(str(tmp_path / "s"), "train")
  with pytest.raises(ValueError, match="fixed layout stores raw features"):
    records.write_store(str(tmp_path / "f"), {"train": random_arrays(3)},
                        encodings={"image": "png"}, layout="fixed")
  records.write_store(str(tmp_path / "f"), {"train": random_arrays(3)}, layout="fixed")
  with pytest.raises((IndexError, tf.errors.OpError), match="outside 0..2"):
    records.RecordSource(str(tmp_path / "f"), "train").read(tf.constant([1, 3], tf.int64))


@pytest.mark.slow
def test_a_pod_slice_refuses_sources_read_in_python_and_takes_the_fixed_layout(
    tmp_path, idx_dir, monkeypatch, fashion_store):
  from tfadv import distribute, errors  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(distribute, "input_runs_without_python", lambda strategy: True)
  bindings = builders.tiny_fashion_bindings(idx_dir)
  params = ["Experiment.train_epochs = None", "Experiment.train_steps = 2"]
  strategy = tf.distribute.get_strategy()
  with pytest.raises(errors.SettingError, match="write_records --layout=fixed"):
    builders.run("train", tmp_path / "a", strategy, bindings + params + [
        f"Experiment.record_store = '{fashion_store}'"], gin_files=["configs/fashion_mnist_plain.gin"])
  assert not (tmp_path / "a" / "checkpoint").exists()
  fixed = tmp_path / "fixed"
  written = run(write_records_command(fixed, idx_dir, "--layout=fixed"))
  assert written.returncode == 0, written.stderr[-2000:]
  assert "train: 256 rows in" in written.stdout and "block(s)" in written.stdout
  result = builders.run("train", tmp_path / "b", strategy, bindings + params + [
      f"Experiment.record_store = '{fixed}'"], gin_files=["configs/fashion_mnist_plain.gin"])
  assert int(result["experiment"].trainer.global_step.numpy()) == 2


LONG = ["Experiment.train_epochs = None", "Experiment.train_steps = 800",
        "Experiment.steps_per_loop = 100", "Experiment.checkpoint_every = 200"]


@pytest.mark.slow
def test_sigkill_and_rerun_on_a_store_match_the_uninterrupted_run(tmp_path, idx_dir,
                                                                  fashion_store):
  store = [f"Experiment.record_store = '{fashion_store}'"]
  whole = run(builders.main_command(PLAIN, tmp_path / "whole", idx_dir, *LONG, *store))
  assert whole.returncode == 0, whole.stderr[-2000:]
  command = builders.main_command(PLAIN, tmp_path / "killed", idx_dir, *LONG, *store)
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if "step 500/800" in line:
      break
  proc.kill()
  proc.wait()
  step = int(tf.train.latest_checkpoint(str(tmp_path / "killed")).rsplit("-", 1)[1])
  assert 0 < step < 800
  resumed = run(command)
  assert resumed.returncode == 0 and f"Training from step {step} to 800" in resumed.stdout
  a, b = checkpoint_values(tmp_path / "whole"), checkpoint_values(tmp_path / "killed")
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_two_workers_on_loopback_train_on_a_store_as_one_worker_in_memory(
    tmp_path, idx_dir, fashion_store):
  steps = ["Experiment.train_epochs = None", "Experiment.train_steps = 12",
           "Experiment.steps_per_loop = 4", "Experiment.checkpoint_every = 4"]
  one = run(builders.main_command(PLAIN, tmp_path / "one", idx_dir, *steps))
  assert one.returncode == 0, one.stderr[-2000:]
  launched = run([sys.executable, os.path.join(REPO, "launch", "multi_worker.py"),
                  "--num_workers=2", "--quiet", f"--log_dir={tmp_path / 'logs'}", "--",
                  *builders.main_command(PLAIN, tmp_path / "two", "/nonexistent", *steps,
                                         f"Experiment.record_store = '{fashion_store}'")[3:]])
  assert launched.stdout.count("exit 0 (ok)") == 2, (
      launched.stdout + open(tmp_path / "logs" / "worker-0.log").read()[-3000:])
  a, b = checkpoint_values(tmp_path / "one"), checkpoint_values(tmp_path / "two")
  assert int(b["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 12
  for key in a:
    # Each worker computes half the global batch: rounding apart, the same sum.
    np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_training_on_a_store_4x_the_memory_budget_stays_under_the_budget(tmp_path):
  budget_mb = 100
  probe = os.path.join(REPO, "benchmarks", "input_pipeline.py")
  result = run([sys.executable, probe, "--memory", f"--store={tmp_path / 'big'}",
                f"--store_mb={4 * budget_mb}"])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  print(report)
  assert report["store_mb"] >= 4 * budget_mb
  assert report["steps"] * report["batch"] >= report["rows"]  # every row read once
  assert report["records_rss_growth_mb"] < budget_mb, report
  # The control: the same data held in memory grows the process by about its size.
  assert report["memory_rss_growth_mb"] > report["store_mb"], report
