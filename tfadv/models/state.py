"""Model state that Keras keeps outside `model.weights`."""

import keras


def random_state_variables(model: keras.Model) -> list:
  """Dropout seed-generator states: in `model.variables`, not `model.weights`.

  A Keras model checkpoints only its weights; a run resumed without these
  would draw other dropout masks than the uninterrupted run.
  """
  weights = {id(w) for w in model.weights}
  return [v for v in model.variables if id(v) not in weights]
