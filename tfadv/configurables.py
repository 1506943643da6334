"""Imports every module with gin configurables, so gin files can name them."""
# pylint: disable=unused-import
from tfadv import attacks, distribute, experiment, optimization, smoothing
from tfadv.data import clue, corpus, images, reviews, text_files
from tfadv.methods import (atta, char_at, embedding_output, fgm, free, freelb,
                           gradient_penalty, pgd, plain, r3f)
from tfadv.models import bert, vision
from tfadv.tasks import image, masked_lm, text
