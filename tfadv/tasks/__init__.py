"""Tasks: what to learn (data, model, loss), independent of how to train.

Every task subclasses `Task` (`tfadv/tasks/base.py`, the written contract).
"""
from tfadv.tasks.base import Task
from tfadv.tasks.image import ImageClassificationTask
from tfadv.tasks.masked_lm import MaskedLMTask
from tfadv.tasks.text import TextClassificationTask
