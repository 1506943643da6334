"""Datasets and input pipelines."""
from tfadv.data.clue import ClueDataset, MalformedRecordError, read_clue_file
from tfadv.data.reviews import ProductReviews
