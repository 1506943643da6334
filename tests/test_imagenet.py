"""TFDS random access and the ImageNet path: a synthetic ImageNet-format TFDS
dataset (JPEG images of varying size, 1,000 classes, ArrayRecord), the
inception crop and centre crop, and both ImageNet configs end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import builders
from builders import REPO
from tfadv.data.images import ImageDataset
from tfadv.data.sources import TfdsSource
from tfadv.errors import MissingInputError
from tfadv.tasks.image import ImageClassificationTask


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return builders.write_synthetic_imagenet(tmp_path_factory.mktemp("tfds"))


def test_tfds_source_reads_rows_by_index_as_tfds_decodes_them(tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = TfdsSource("synthetic_imagenet", "train", data_dir=tfds_dir)
  assert source.num_examples == 64 and source.specs["image"].dtype == tf.string
  assert len(source.label_names()) == 1000
  indices = [5, 0, 63, 5]
  batch = source.read(tf.constant(indices, tf.int64))
  encoded = tfds.data_source("synthetic_imagenet", split="train", data_dir=tfds_dir,
                             decoders={"image": tfds.decode.SkipDecoding()})
  decoded = tfds.data_source("synthetic_imagenet", split="train", data_dir=tfds_dir)
  for row, index in enumerate(indices):
    assert batch["image"][row].numpy() == encoded[index]["image"]  # the stored bytes
    assert int(batch["label"][row]) == int(decoded[index]["label"])
    # TensorFlow's JPEG decoder and TFDS's (PIL) round differently.
    ours = tf.io.decode_jpeg(batch["image"][row]).numpy().astype(int)
    assert ours.shape == decoded[index]["image"].shape
    assert np.abs(ours - decoded[index]["image"]).mean() < 2.0


def test_a_fixed_size_tfds_image_is_decoded_in_graph_and_download_prepares_it(tmp_path):
  # Fashion-MNIST's shape of TFDS dataset (28×28×1 PNG there, 6×5×1 here):
  # fixed-size images come back as uint8 arrays, decoded by TensorFlow in the
  # input graph; download=True prepares a dataset not prepared yet.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SyntheticFixedImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(6, 5, 1)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.RandomState(0)
      for i in range(7):
        yield i, {"image": rng.randint(0, 256, (6, 5, 1)).astype(np.uint8), "label": i % 3}

  with pytest.raises(MissingInputError, match="is not prepared"):
    TfdsSource("synthetic_fixed_images", "train", data_dir=str(tmp_path))
  source = TfdsSource("synthetic_fixed_images", "train", data_dir=str(tmp_path), download=True)
  assert source.specs["image"] == tf.TensorSpec((6, 5, 1), tf.uint8)
  batch = tf.function(source.read)(tf.constant([6, 0, 3], tf.int64))  # as a pipeline reads
  decoded = tfds.data_source("synthetic_fixed_images", split="train", data_dir=str(tmp_path))
  assert batch["image"].dtype == tf.uint8 and batch["label"].dtype == tf.int64
  for row, index in enumerate([6, 0, 3]):
    np.testing.assert_array_equal(batch["image"][row].numpy(), decoded[index]["image"])  # PNG
    assert int(batch["label"][row]) == int(decoded[index]["label"])


def test_a_missing_or_tfrecord_tfds_dataset_is_one_line_naming_tfds_build(tfds_dir, tmp_path):
  # `tfds_dir` registers the builder (its class is defined when the fixture
  # runs): without it the test depended on which tests its worker ran first.
  with pytest.raises(MissingInputError, match="tfds build synthetic_imagenet"):
    TfdsSource("synthetic_imagenet", "train", data_dir=str(tmp_path / "empty"))


def test_an_unknown_tfds_name_is_one_line_naming_the_config_field():
  with pytest.raises(MissingInputError, match=r"no dataset 'no_such_set_xyz'.*ImageDataset\.name"):
    TfdsSource("no_such_set_xyz", "train")


def coordinate_image(height, width):
  """uint8 [h, w, 3]: row (×255/(h−1)), column (×255/(w−1)) and a constant."""
  rows = np.round(np.linspace(0, 255, height))[:, None].repeat(width, 1)
  cols = np.round(np.linspace(0, 255, width))[None, :].repeat(height, 0)
  return np.stack([rows, cols, np.full_like(rows, 128)], -1).astype(np.uint8)


def test_random_resized_crop_takes_8_to_100_percent_at_aspect_3_4_to_4_3_then_flips():
  task = ImageClassificationTask(ImageDataset("unused"), crop="inception", image_size=32)
  height, width = 180, 240
  image = tf.constant(coordinate_image(height, width))
  areas, flips, seen = [], 0, set()
  for i in range(60):
    crop = task.augment_batch({"image": image[None]}, tf.constant([7, i], tf.int64))["image"][0]
    crop = crop.numpy().astype(float)
    assert crop.shape == (32, 32, 3)
    rows = crop[:, :, 0].mean(1) * (height - 1) / 255  # the source row of each output row
    cols = crop[:, :, 1].mean(0) * (width - 1) / 255
    flipped = cols[0] > cols[-1]
    flips += flipped
    crop_h = (rows[-1] - rows[0]) * 32 / 31
    crop_w = abs(cols[-1] - cols[0]) * 32 / 31
    area = crop_h * crop_w / (height * width)
    areas.append(area)
    assert 0.06 <= area <= 1.02, area  # 8–100 %, up to resampling at the edges
    assert 3 / 4 * 0.85 <= crop_w / crop_h <= 4 / 3 * 1.15 or area > 0.9, (crop_w, crop_h)
    seen.add(tuple(np.round(crop[0, 0]).tolist()))
  assert 15 <= flips <= 45  # a fair coin
  assert min(areas) < 0.3 and max(areas) > 0.6  # the whole range is drawn from
  assert len(seen) > 40  # crops differ by seed
  again = task.augment_batch({"image": image[None]}, tf.constant([7, 3], tf.int64))["image"]
  first = task.augment_batch({"image": image[None]}, tf.constant([7, 3], tf.int64))["image"]
  np.testing.assert_array_equal(again.numpy(), first.numpy())  # a function of the seed


def test_centre_crop_resizes_the_shorter_side_and_keeps_the_middle():
  task = ImageClassificationTask(ImageDataset("unused"), crop="inception", image_size=32,
                                 resize_size=40)
  height, width = 100, 160  # shorter side 100 → 40: 40 × 64, centre 32 × 32
  image = tf.constant(coordinate_image(height, width))
  crop = task.preprocess_eval({"image": image[None]})["image"][0].numpy().astype(float)
  rows = crop[:, 0, 0] * (height - 1) / 255
  cols = crop[0, :, 1] * (width - 1) / 255
  # Output row r samples source row (r + 4 + 0.5) * 100/40 − 0.5 (4 rows cut
  # off each side); column c samples ((c + 16 + 0.5) * 160/64 − 0.5).
  np.testing.assert_allclose(rows, (np.arange(32) + 4.5) * 2.5 - 0.5, atol=1.5)
  np.testing.assert_allclose(cols, (np.arange(32) + 16.5) * 2.5 - 0.5, atol=1.5)


# The configs as they are (ResNet-50, the crops, bfloat16, their methods and
# attacks), smaller: 32² crops of the 64² images, batches of 8, 8 steps, 2
# attack steps, lr 0.1 → 1e-3 (ResNet-50 from scratch diverges at 0.1 on
# batches of 8), and without XLA (compiling ResNet-50 on this CPU takes
# minutes; every method's XLA step is tested on small models).
SMALL = ["ImageClassificationTask.image_size = 32", "ImageClassificationTask.resize_size = 36",
         "Experiment.global_batch_size = 8", "Experiment.eval_batch_size = 8",
         "Experiment.train_epochs = None", "Experiment.train_steps = 8",
         "Experiment.steps_per_loop = 4", "Experiment.checkpoint_every = 8",
         "pgd10/InputAttack.num_steps = 2", "pgd50/InputAttack.num_steps = 2",
         "sgd_momentum.learning_rate = 1e-3", "Experiment.jit_compile = False"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["imagenet_free4_resnet50", "imagenet_pgd_resnet50"])
def test_imagenet_configs_train_and_evaluate_end_to_end_on_synthetic_imagenet(
    tmp_path, tfds_dir, config):
  params = SMALL + ["ImageDataset.name = 'synthetic_imagenet'",
                    f"ImageDataset.data_dir = '{tfds_dir}'"]
  command = [sys.executable, "-m", "tfadv.main",
             f"--gin_file={os.path.join(REPO, 'configs', config + '.gin')}",
             f"--model_dir={tmp_path}", "--mode=train_and_evaluate"] + [
                 f"--gin_param={p}" for p in params]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.load(open(tmp_path / "eval_results_validation.json"))
  assert records["step"] == 8
  for key in ("accuracy", "accuracy_pgd10", "accuracy_pgd50"):
    assert 0.0 <= records[key] <= 1.0, records
  assert np.isfinite(records["loss"]), records
  config_text = open(tmp_path / "operative_config.gin").read()
  assert "mixed_bfloat16" in config_text and "'inception'" in config_text
  assert len(json.load(open(tmp_path / "labels.json"))["labels"]) == 1000


@pytest.mark.slow
def test_a_fixed_store_written_from_tfds_streams_the_jpegs_and_feeds_a_pod_slice(
    tmp_path, tfds_dir, monkeypatch):
  """ImageNet on a pod slice: `write_records --layout=fixed` from the TFDS
  config (variable-size JPEGs kept encoded), read by TensorFlow ops alone,
  which the pod check accepts; the crops train from it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tfadv import distribute  # pylint: disable=g-import-not-at-top
  from tfadv import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  from tfadv.tools import write_records  # pylint: disable=g-import-not-at-top
  bindings = SMALL + ["ImageDataset.name = 'synthetic_imagenet'",
                      f"ImageDataset.data_dir = '{tfds_dir}'",
                      "ImageClassificationTask.model_fn = @small_cnn",
                      "Experiment.eval_attacks = {}", "Experiment.train_steps = 2",
                      "Experiment.mixed_precision = None"]
  builders.configure(bindings, ["configs/imagenet_free4_resnet50.gin"])
  task = experiment_lib.Experiment().task  # pylint: disable=no-value-for-parameter
  write_records.write(task, str(tmp_path / "store"), layout="fixed",
                      shard_bytes=100_000)
  metadata = records.read_metadata(str(tmp_path / "store"))
  assert metadata["features"]["image"]["encoding"] == "bytes"
  assert metadata["splits"]["train"]["blocks"] > 1  # rows across block files
  source = records.RecordSource(str(tmp_path / "store"), "train")
  encoded = tfds.data_source("synthetic_imagenet", split="train", data_dir=tfds_dir,
                             decoders={"image": tfds.decode.SkipDecoding()})
  rows = source.read(tf.constant([63, 0, 31], tf.int64))
  for row, index in enumerate([63, 0, 31]):
    assert rows["image"][row].numpy() == encoded[index]["image"]
    assert int(rows["label"][row]) == int(encoded[index]["label"])
  monkeypatch.setattr(distribute, "input_runs_without_python", lambda strategy: True)
  # The config's own TFDS random access reads in Python: refused, nothing written.
  from tfadv import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.SettingError, match="TfdsSource reads train rows in Python"):
    builders.run("train", tmp_path / "tfds", tf.distribute.get_strategy(), bindings,
                 ["configs/imagenet_free4_resnet50.gin"])
  assert not (tmp_path / "tfds" / "checkpoint").exists()
  result = builders.run("train", tmp_path / "run", tf.distribute.get_strategy(), bindings + [
      f"Experiment.record_store = '{tmp_path / 'store'}'",
      f"ImageDataset.data_dir = '{tmp_path / 'absent'}'"],
      ["configs/imagenet_free4_resnet50.gin"])
  assert int(result["experiment"].trainer.global_step.numpy()) == 2
