"""Model factories."""
from tfadv.models.bert import bert_classifier
