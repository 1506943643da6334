"""Every private Keras / TensorFlow attribute tfadv touches, in one place.

Each shim checks that what it reaches for exists and fails with a message
naming this module when a Keras or TensorFlow upgrade moves it;
`tests/test_compat.py` exercises every one against the installed versions.
Nothing else in tfadv reaches into a private name of Keras or TensorFlow.
"""

import contextlib
import types
from typing import Callable

import keras
import tensorflow as tf
from tensorflow.python.framework import config as _tf_config  # pylint: disable=g-direct-tensorflow-import


class CompatibilityError(RuntimeError):
  """The installed Keras/TensorFlow moved something tfadv relies on."""


def _missing(what: str) -> CompatibilityError:
  return CompatibilityError(
      f"{what} is not where tfadv expects it in Keras {keras.__version__} / "
      f"TensorFlow {tf.__version__}; tfadv/compat.py needs updating.")


def skip_optimizer_all_reduce(optimizer: keras.optimizers.Optimizer) -> None:
  """Makes `optimizer` (and a `LossScaleOptimizer`'s inner one) apply gradients as given.

  Keras's TensorFlow optimizer all-reduces gradients in `apply_gradients`
  when called in a replica context; tfadv reduces them itself, once
  (`tfadv.trainer.apply_method`).
  """
  inner = getattr(optimizer, "inner_optimizer", None)
  for opt in [optimizer] + ([inner] if inner is not None else []):
    if not hasattr(opt, "_all_reduce_sum_gradients"):
      raise _missing("Optimizer._all_reduce_sum_gradients")
    opt._all_reduce_sum_gradients = list  # pylint: disable=protected-access


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` spans several worker processes."""
  extended = strategy.extended
  if not hasattr(extended, "_in_multi_worker_mode"):
    raise _missing("StrategyExtended._in_multi_worker_mode")
  return extended._in_multi_worker_mode()  # pylint: disable=protected-access


def loss_tracker(model: keras.Model):
  """The `Mean` metric behind `fit`'s reported "loss"."""
  tracker = getattr(model, "_loss_tracker", None)
  if tracker is None:
    raise _missing("Model._loss_tracker")
  return tracker


def replace_train_step(model: keras.Model, train_step: Callable) -> None:
  """Makes `model.fit` run `train_step(model, data)` instead of Keras's."""
  if not hasattr(model, "train_function"):
    raise _missing("Model.train_function")
  model.train_step = types.MethodType(train_step, model)
  model.train_function = None  # rebuilt around the new step on the next fit


@contextlib.contextmanager
def swapped_call(layer: keras.layers.Layer, call: Callable):
  """Within the block, `layer.__call__` runs `call` in place of `layer.call`.

  Keras's `Layer.__call__` looks `call` up on the instance, so an instance
  attribute shadows the class's method for the block's duration.
  """
  if "call" in vars(layer):
    raise RuntimeError(f"Layer {layer.name!r} is already hooked.")
  layer.call = call
  try:
    yield
  finally:
    del layer.call


def op_determinism_enabled() -> bool:
  if not hasattr(_tf_config, "is_op_determinism_enabled"):
    raise _missing("tensorflow.python.framework.config.is_op_determinism_enabled")
  return _tf_config.is_op_determinism_enabled()


def disable_op_determinism() -> None:
  if not hasattr(_tf_config, "disable_op_determinism"):
    raise _missing("tensorflow.python.framework.config.disable_op_determinism")
  _tf_config.disable_op_determinism()


def gin_configurables(module_prefix: str) -> dict:
  """{name: function or class} of every gin configurable defined under
  `module_prefix` (gin keeps its registry private)."""
  import gin  # pylint: disable=g-import-not-at-top
  registry = getattr(gin.config, "_REGISTRY", None)
  if registry is None:
    raise _missing("gin.config._REGISTRY")
  return {selector: info.wrapped for selector, info in registry.items()
          if info.module.startswith(module_prefix)}
