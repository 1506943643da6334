"""Tasks: what to learn (data, model, loss), independent of how to train."""
from tfadv.tasks.text import TextClassificationTask
