"""Test set-up: two logical CPU devices, quiet TensorFlow, shared data paths."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from tfadv import distribute  # pylint: disable=g-import-not-at-top

# Logical devices must exist before TensorFlow initialises; every test then
# has /cpu:0 and /cpu:1 for MirroredStrategy, and the default strategy uses
# /cpu:0 alone.
distribute.split_cpu(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FewCLUE: $TFADV_SHARED_DATA/fewclue, else ../shared/data/fewclue beside the
# repo, else the cache `python -m tfadv.tools.get_data fewclue` fills.
_CANDIDATES = [os.path.join(d, "fewclue") for d in (
    os.environ.get("TFADV_SHARED_DATA"), os.path.join(os.path.dirname(REPO), "shared", "data"),
    os.path.join(os.path.expanduser("~"), ".cache", "tfadv", "data")) if d]
FEWCLUE = next((d for d in _CANDIDATES if os.path.isdir(d)), _CANDIDATES[0])
NO_FEWCLUE = ("FewCLUE not found (looked in " + ", ".join(_CANDIDATES) + "): fetch it with "
              "`python -m tfadv.tools.get_data fewclue --tasks=tnews,iflytek,bustm,eprstmt`.")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fewclue_dir():
  if not os.path.isdir(FEWCLUE):
    pytest.skip(NO_FEWCLUE)
  return FEWCLUE


@pytest.fixture(scope="session")
def mirrored():
  """One MirroredStrategy over /cpu:0 and /cpu:1 for the whole session.

  Each strategy object numbers its collective ops from the same start; two
  of them in one process over the same devices collide, so tests share one
  (as a real run has one).
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def fresh_gin_config():
  """Gin's bindings are process-global: a test that parses a config must not
  hand them to whichever test its worker runs next (pytest-xdist deals tests
  to workers differently each run; a leaked `small_cnn.filters` once changed
  another test's model)."""
  import gin  # pylint: disable=g-import-not-at-top
  yield
  gin.clear_config()
