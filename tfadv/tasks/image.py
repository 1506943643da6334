"""Image classification: uint8 arrays in, [0, 1] float images into a Keras CNN."""

import json
import os
from typing import Callable, Dict, Optional

import gin
import keras
import numpy as np
import tensorflow as tf

from tfadv import checks
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

  With `crop="inception"` (ImageNet), images of any size (encoded, decoded
  in the input pipeline) become `image_size`² crops: for training, the
  random-resized crop of torchvision's `RandomResizedCrop` (area 8–100 %,
  aspect ratio 3/4–4/3, 10 tries, else the whole image) and a random
  horizontal flip, drawn statelessly from the batch's position; for
  evaluation, the shorter side resized to `resize_size` and the centre
  `image_size`² crop (`Resize(256)`, `CenterCrop(224)`), as Shafahi et al.'s
  ImageNet code does. Crops stay uint8 (rounded), like every image here.

  Args:
    dataset: an `ImageDataset`.
    model_fn: `(input_shape, num_classes) -> keras.Model` returning logits.
    augment: random crop and flip on training batches.
    crop: None (images as stored) or "inception".
    image_size: the crop's side (with `crop`).
    resize_size: the evaluation resize of the shorter side (default
      image_size / 0.875: 256 for 224).

  Example:
  >>> task = ImageClassificationTask(ImageDataset("fashion_mnist"))
  >>> task.prepare("/tmp/run")
  >>> model = task.build_model()  # Madry's CNN on 28×28×1
  """

  def __init__(self, dataset=gin.REQUIRED, model_fn: Callable = small_cnn,
               augment: bool = False, crop: Optional[str] = None,
               image_size: int = 224, resize_size: Optional[int] = None):
    checks.check("ImageClassificationTask", crop=(crop, checks.one_of(("inception",))),
                 image_size=(image_size, checks.AT_LEAST_ONE),
                 resize_size=(resize_size, checks.AT_LEAST_ONE))
    self.dataset = dataset
    self.model_fn = model_fn
    self.augment = augment
    self.crop = crop
    self.image_size = image_size
    self.resize_size = resize_size or int(round(image_size / 0.875))
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
    if self.crop:
      return (self.image_size, self.image_size, 3)
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
    """Training batches: the random-resized crop and flip (`crop`), or the
    pad-4 random crop and horizontal flip (`augment`), from `seed` [2]."""
    if self.crop:
      batch = dict(batch)
      seeds = tf.random.experimental.stateless_split(seed, tf.shape(batch[IMAGE])[0])
      batch[IMAGE] = tf.map_fn(
          lambda args: self._random_resized_crop(*args), (batch[IMAGE], seeds),
          fn_output_signature=tf.TensorSpec(self.image_shape, tf.uint8))
      return batch
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

  def preprocess_eval(self, batch):
    """Evaluation batches: the resize and centre crop (`crop`), else as stored."""
    if not self.crop:
      return batch
    batch = dict(batch)
    batch[IMAGE] = tf.map_fn(self._center_crop, batch[IMAGE],
                             fn_output_signature=tf.TensorSpec(self.image_shape, tf.uint8))
    return batch

  @staticmethod
  def _decoded(image):
    if image.dtype == tf.string:
      return tf.io.decode_image(image, channels=3, expand_animations=False)
    return image

  def _resized(self, image, size):
    resized = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

  def _random_resized_crop(self, image, seed):
    image = self._decoded(image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, size)
    crop = self._resized(crop, [self.image_size, self.image_size])
    flip = tf.random.stateless_uniform([], seed + 1, 0, 2, dtype=tf.int32)
    crop = tf.cond(flip > 0, lambda: tf.reverse(crop, [1]), lambda: crop)
    return tf.ensure_shape(crop, self.image_shape)

  def _center_crop(self, image):
    image = self._decoded(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = self.resize_size / tf.reduce_min(shape)
    resized = self._resized(image, tf.cast(tf.round(shape * scale), tf.int32))
    top_left = (tf.shape(resized)[:2] - self.image_size) // 2
    crop = tf.slice(resized, tf.concat([top_left, [0]], 0),
                    [self.image_size, self.image_size, 3])
    return tf.ensure_shape(crop, self.image_shape)

  def export(self, model: keras.Model, export_dir: str) -> str:
    """Saves the bare Keras model ([0, 1] images in, logits out)."""
    tf.io.gfile.makedirs(export_dir)
    path = os.path.join(export_dir, "model.keras")
    model.save(path)
    with tf.io.gfile.GFile(os.path.join(export_dir, "labels.json"), "w") as f:
      json.dump({"labels": self.label_names, "input": "float32 images in [0, 1]",
                 "output": "logits"}, f, indent=1)
    return path
