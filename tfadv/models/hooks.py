"""A hook on one layer's output: run a model with a perturbation added there.

Text adversarial methods that perturb the embedding layer's *output* (batch ×
length × hidden), as FreeLB and most PyTorch FGM/PGD code do, need to run an
unchanged model with `output + δ` in place of that layer's output, and to
differentiate through δ. Keras 3 functional models call each layer's `call`
through `Layer.__call__`, so `EmbeddingOutputHook.adding(δ)` swaps in, for
the duration of a `with` block, a `call` that returns the original output
plus δ. Inside a `tf.function` the swap happens while the step is traced, so
the compiled step carries the addition and no Python runs per step.

For keras-hub's BERT the hooked layer is `token_embedding` (a
`ReversibleEmbedding`): δ is added to the token embeddings before position
and segment embeddings and layer normalisation, as in FreeLB. Its reverse
(output-projection) use, as in a masked LM head, is left alone.
"""

import contextlib
from typing import List

import keras
import tensorflow as tf

from tfadv import compat


def _all_layers(model) -> List[keras.layers.Layer]:
  found, stack = [], list(getattr(model, "layers", []))
  while stack:
    layer = stack.pop(0)
    found.append(layer)
    stack.extend(getattr(layer, "layers", []))
  return found


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
  """The one layer of `model` (nested models included) named `name`.

  Raises a `ValueError` that lists the embedding-like layers when there is
  no such layer or more than one.
  """
  layers = _all_layers(model)
  matches = [layer for layer in layers if layer.name == name]
  if len(matches) == 1:
    return matches[0]
  candidates = sorted({f"{layer.name} ({type(layer).__name__})" for layer in layers
                       if "embed" in layer.name.lower()
                       or isinstance(layer, keras.layers.Embedding)})
  problem = "matches several layers" if matches else "matches no layer"
  raise ValueError(
      f"Embedding layer {name!r} {problem} of model {model.name!r}. "
      f"Embedding-like layers: {candidates or '(none)'}. Set the method's "
      "`layer_name` to one of them.")


class EmbeddingOutputHook:
  """Adds a tensor to the output of `model`'s layer `layer_name`.

  Args:
    model: a Keras model (keras-hub task models included).
    layer_name: name of the layer whose output is perturbed, e.g.
      `"token_embedding"` in keras-hub's BERT.

  Example:
  >>> hook = EmbeddingOutputHook(classifier, "token_embedding")
  >>> delta = tf.zeros([batch, length, hook.output_dim])
  >>> with hook.adding(delta):
  ...   logits = classifier(inputs, training=True)
  """

  def __init__(self, model: keras.Model, layer_name: str = "token_embedding"):
    self.model = model
    self.layer = find_layer(model, layer_name)
    self.layer_name = layer_name

  @property
  def output_dim(self) -> int:
    dim = getattr(self.layer, "output_dim", None)
    if dim is None:
      raise ValueError(f"Layer {self.layer_name!r} ({type(self.layer).__name__}) "
                       "has no `output_dim`; hook an embedding layer.")
    return int(dim)

  @contextlib.contextmanager
  def adding(self, delta: tf.Tensor, detach: bool = False):
    """Within the block, the layer returns `output + delta` (cast to its dtype).

    `detach=True` returns `stop_gradient(output) + delta`: no gradient
    reaches the layer's weights through this block's passes (R3F's noisy
    branch, fairseq `examples/rxf`: `token_embeddings.detach() + noise`).
    """
    layer = self.layer
    original = layer.call

    def call(inputs, *args, **kwargs):
      outputs = original(inputs, *args, **kwargs)
      if kwargs.get("reverse", False):  # ReversibleEmbedding's output projection
        return outputs
      if detach:
        outputs = tf.stop_gradient(outputs)
      return outputs + tf.cast(delta, outputs.dtype)

    with compat.swapped_call(layer, call):
      yield
