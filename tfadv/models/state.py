"""Model state that Keras keeps outside `model.weights`, and attack passes that leave it alone."""

import contextlib

import keras


def random_state_variables(model: keras.Model) -> list:
  """Dropout seed-generator states: in `model.variables`, not `model.weights`.

  A Keras model checkpoints only its weights; a run resumed without these
  would draw other dropout masks than the uninterrupted run.
  """
  weights = {id(w) for w in model.weights}
  return [v for v in model.variables if id(v) not in weights]


@contextlib.contextmanager
def ascent_pass(model: keras.Model):
  """Runs the block as an attack's ascent pass of `model`.

  The pass's state updates (BatchNorm moving statistics) are discarded: only
  the passes whose weight gradients are applied update them. The dropout
  seed states are kept moving forward, so the next pass (the next ascent
  step, or the training pass) draws fresh dropout masks instead of reusing
  this pass's.
  """
  seeds = random_state_variables(model)
  with keras.StatelessScope() as scope:
    yield scope
  for state in seeds:
    advanced = scope.get_current_value(state)
    if advanced is not None:
      state.assign(advanced)
