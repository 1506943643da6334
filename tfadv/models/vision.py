"""Image classifiers of the adversarial-training literature, as Keras functional models.

- `small_cnn`: Madry et al.'s MNIST network (conv 32 5×5, pool, conv 64
  5×5, pool, dense 1024).
- `preact_resnet18`: He et al.'s pre-activation ResNet-18 (Wong et al.'s
  and Rice et al.'s CIFAR-10 model).
- `wide_resnet`: Zagoruyko & Komodakis's WRN-depth-width; Madry's and
  Shafahi's CIFAR-10 model is WRN-32-10.
- `resnet50`: ResNet-50 (ImageNet; Shafahi et al.'s Free-4 model).

All take images in [0, 1] and return logits (ResNet-50 standardizes the
channels in its first layer), so an exported model is a plain Keras model
other tools can attack.
"""

from typing import Sequence

import gin
import keras
from keras import layers

from tfadv import checks
from tfadv.errors import SettingError


@gin.configurable
def small_cnn(input_shape: Sequence[int], num_classes: int,
              filters: Sequence[int] = (32, 64), dense_units: int = 1024) -> keras.Model:
  """Madry et al.'s MNIST CNN.

  Example:
  >>> model = small_cnn((28, 28, 1), 10)
  >>> model(np.zeros((2, 28, 28, 1), "float32")).shape
  (2, 10)
  """
  inputs = keras.Input(tuple(input_shape), name="image")
  x = inputs
  for width in filters:
    x = layers.Conv2D(width, 5, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
  x = layers.Flatten()(x)
  x = layers.Dense(dense_units, activation="relu")(x)
  logits = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, logits, name="small_cnn")


def _bn_relu(x, name):
  x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
  return layers.ReLU(name=f"{name}_relu")(x)


def _preact_block(x, width, stride, name, dropout=0.0):
  """Pre-activation basic block: BN-ReLU-conv3×3, BN-ReLU-conv3×3, plus shortcut."""
  out = _bn_relu(x, f"{name}_1")
  shortcut = x
  if stride != 1 or x.shape[-1] != width:
    # The projection sees the pre-activated input, as in He et al. (2016b).
    shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False,
                             name=f"{name}_shortcut")(out)
  out = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv1")(out)
  out = _bn_relu(out, f"{name}_2")
  if dropout:
    out = layers.Dropout(dropout)(out)
  out = layers.Conv2D(width, 3, padding="same", use_bias=False,
                      name=f"{name}_conv2")(out)
  return layers.Add(name=f"{name}_add")([out, shortcut])


@gin.configurable
def preact_resnet18(input_shape: Sequence[int], num_classes: int,
                    widths: Sequence[int] = (64, 128, 256, 512)) -> keras.Model:
  """Pre-activation ResNet-18 for 32×32 images (two blocks per stage).

  Example:
  >>> model = preact_resnet18((32, 32, 3), 10)
  """
  inputs = keras.Input(tuple(input_shape), name="image")
  x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
  for stage, width in enumerate(widths):
    for block in range(2):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _preact_block(x, width, stride, f"stage{stage}_block{block}")
  x = _bn_relu(x, "final")
  x = layers.GlobalAveragePooling2D()(x)
  logits = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, logits, name="preact_resnet18")


@gin.configurable
def wide_resnet(input_shape: Sequence[int], num_classes: int, depth: int = 28,
                width: int = 10, dropout: float = 0.0) -> keras.Model:
  """WRN-depth-width with pre-activation blocks.

  Zagoruyko & Komodakis require depth = 6n + 4 (WRN-28-10). Madry's CIFAR-10
  model, which Shafahi et al. reuse, is called WRN-32-10: 5 blocks per stage
  (depth = 6·5 + 2 without counting the projection shortcuts), so depth =
  6n + 2 is accepted too; both give n blocks per stage.

  Example:
  >>> model = wide_resnet((32, 32, 3), 10, depth=32, width=10)  # the paper's
  >>> tiny = wide_resnet((32, 32, 3), 10, depth=10, width=1)
  """
  checks.check("wide_resnet", depth=(depth, checks.AT_LEAST_ONE),
               width=(width, checks.AT_LEAST_ONE), dropout=(dropout, checks.OPEN_FRACTION))
  if (depth - 4) % 6 == 0:
    blocks = (depth - 4) // 6
  elif (depth - 2) % 6 == 0:
    blocks = (depth - 2) // 6
  else:
    raise SettingError(f"wide_resnet.depth = {depth} is out of range: expected 6n + 4 "
                       "(e.g. 28) or 6n + 2 (e.g. 32, Madry's WRN-32-10).")
  inputs = keras.Input(tuple(input_shape), name="image")
  x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
  for stage, base in enumerate((16, 32, 64)):
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _preact_block(x, base * width, stride, f"stage{stage}_block{block}", dropout)
  x = _bn_relu(x, "final")
  x = layers.GlobalAveragePooling2D()(x)
  logits = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, logits, name=f"wrn_{depth}_{width}")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@gin.configurable
def resnet50(input_shape: Sequence[int], num_classes: int,
             mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD) -> keras.Model:
  """He et al.'s ResNet-50 (`keras.applications.ResNet50`, random weights),
  the ImageNet model of Shafahi et al.'s Free-m and Wong et al.'s FGSM-RS.

  It takes [0, 1] images like every model here; the per-channel
  standardization their code applies after the perturbed image is clamped
  (`in1.sub_(mean).div_(std)`) is the model's first layer, so the attack's
  ε stays in pixel units.

  Example:
  >>> model = resnet50((224, 224, 3), 1000)
  >>> model(np.zeros((1, 224, 224, 3), "float32")).shape
  (1, 1000)
  """
  inputs = keras.Input(tuple(input_shape), name="image")
  x = layers.Normalization(mean=list(mean), variance=[s * s for s in std],
                           name="standardize")(inputs)
  body = keras.applications.ResNet50(
      weights=None, include_top=True, input_shape=tuple(input_shape),
      classes=num_classes, classifier_activation=None)
  logits = body(x)
  return keras.Model(inputs, logits, name="resnet50")
