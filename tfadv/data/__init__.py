"""Datasets (one contract: `tfadv.data.base`) and input pipelines."""
from tfadv.data.base import ArrayDataset, Dataset, TextDataset, carve_validation
from tfadv.data.clue import ClueDataset, MalformedRecordError, read_clue_file
from tfadv.data.text_files import TextFileDataset, read_text_file
from tfadv.data.corpus import PretrainingCorpus
from tfadv.data.images import ImageDataset
from tfadv.data.reviews import ProductReviews
