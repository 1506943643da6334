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
SHARED = os.environ.get("TFADV_SHARED_DATA",
                        os.path.join(os.path.dirname(REPO), "shared", "data"))
FEWCLUE = os.path.join(SHARED, "fewclue")
NO_FEWCLUE = (f"FewCLUE not found at {FEWCLUE}: put the shared data beside the repo "
              "(../shared/data/fewclue) or set TFADV_SHARED_DATA to its data folder.")
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
