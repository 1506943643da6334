"""Imports every module with gin configurables, so gin files can name them."""
# pylint: disable=unused-import
from tfadv import distribute, experiment, optimization
from tfadv.data import clue, reviews
from tfadv.methods import fgm, gradient_penalty, plain
from tfadv.models import bert
from tfadv.tasks import text
