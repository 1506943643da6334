"""Image classification: uint8 arrays in, [0, 1] float images into a Keras CNN."""

import json
import os
from typing import Callable, Dict

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv.models.vision import small_cnn
from tfadv.tasks.base import Task, load_or_save_labels

IMAGE, LABEL = "image", "label"


@gin.configurable
class ImageClassificationTask(Task):
  """Classification of an `ImageDataset` with a model from `tfadv.models.vision`.

  Pixels are scaled to [0, 1] inside the step (attacks and their ε live in
  that range). With `augment=True`, training batches get the standard
  CIFAR augmentation: pad 4, random 32×32 crop, random horizontal flip,
  drawn from the batch's position in the run (a resumed run augments as an
  uninterrupted one).

  Args:
    dataset: an `ImageDataset`.
    model_fn: `(input_shape, num_classes) -> keras.Model` returning logits.
    augment: random crop and flip on training batches.

  Example:
  >>> task = ImageClassificationTask(ImageDataset("fashion_mnist"))
  >>> task.prepare("/tmp/run")
  >>> model = task.build_model()  # Madry's CNN on 28×28×1
  """

  def __init__(self, dataset=gin.REQUIRED, model_fn: Callable = small_cnn,
               augment: bool = False):
    self.dataset = dataset
    self.model_fn = model_fn
    self.augment = augment
    self.label_names = []
    self._arrays: Dict[str, Dict[str, np.ndarray]] = {}

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def prepare(self, model_dir: str) -> None:
    self.source("train")  # missing data stops the run before anything is written
    self.label_names = load_or_save_labels(model_dir, self.dataset.label_names,
                                           self.dataset.name)

  def arrays(self, split: str) -> Dict[str, np.ndarray]:
    if split not in self._arrays:
      self._arrays[split] = self.dataset.arrays(split)
    return self._arrays[split]

  def make_source(self, split: str):
    """The dataset's own random-access source (TFDS in ArrayRecord format)
    where it has one, else its arrays in memory."""
    source = self.dataset.example_source(split) if hasattr(
        self.dataset, "example_source") else None
    return source if source is not None else super().make_source(split)

  @property
  def image_shape(self):
    return tuple(self.source("train").specs[IMAGE].shape)

  def input_shape(self, per_replica_batch: int):
    """Shape of one replica's model inputs (a method's buffers use it)."""
    return (per_replica_batch,) + tuple(self.image_shape)

  def build_model(self) -> keras.Model:
    return self.model_fn(input_shape=self.image_shape, num_classes=self.num_classes)

  @staticmethod
  def split_batch(batch):
    return tf.cast(batch[IMAGE], tf.float32) / 255.0, batch[LABEL]

  def augment_batch(self, batch, seed):
    """Pad-4 random crop and horizontal flip of a uint8 batch, from `seed` [2]."""
    if not self.augment:
      return batch
    images = batch[IMAGE]
    size = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]])
    offsets = tf.random.stateless_uniform([size, 2], seed, 0, 9, dtype=tf.int32)
    flips = tf.random.stateless_uniform([size], seed + 1, 0, 2, dtype=tf.int32)

    def one(args):
      image, offset, flip = args
      crop = tf.slice(image, [offset[0], offset[1], 0], [height, width, -1])
      return tf.cond(flip > 0, lambda: tf.reverse(crop, [1]), lambda: crop)

    batch = dict(batch)
    batch[IMAGE] = tf.map_fn(one, (padded, offsets, flips), fn_output_signature=images.dtype)
    return batch

  def export(self, model: keras.Model, export_dir: str) -> str:
    """Saves the bare Keras model ([0, 1] images in, logits out)."""
    tf.io.gfile.makedirs(export_dir)
    path = os.path.join(export_dir, "model.keras")
    model.save(path)
    with tf.io.gfile.GFile(os.path.join(export_dir, "labels.json"), "w") as f:
      json.dump({"labels": self.label_names, "input": "float32 images in [0, 1]",
                 "output": "logits"}, f, indent=1)
    return path
