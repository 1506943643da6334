"""The tests' shared builders: tiny models and batches, trainers, in-process experiments.

Test files import from here, never from each other.
"""

import gzip
import os
import struct
import sys

import gin
import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfadv import experiment as experiment_lib
from tfadv.data.base import TextDataset
from tfadv.data.vocab import SPECIAL_TOKENS
from tfadv.data.pipeline import distributed_dataset
from tfadv.experiment import build_trainer
from tfadv.main import parse_config
from tfadv.models.state import random_state_variables
from tfadv.models.vision import small_cnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = [
    "bert_classifier.num_layers = 1",
    "bert_classifier.num_heads = 2",
    "bert_classifier.hidden_dim = 32",
    "bert_classifier.intermediate_dim = 64",
    "TextClassificationTask.sequence_length = 32",
    "TextClassificationTask.vocabulary_size = 3000",
]


def configure(bindings, gin_files=()):
  gin.clear_config()
  parse_config([os.path.join(REPO, f) for f in gin_files], list(bindings))


def tnews_bindings(fewclue_dir, **experiment):
  lines = TINY_MODEL + [
      "Experiment.task = @TextClassificationTask()",
      "TextClassificationTask.dataset = @ClueDataset()",
      f"ClueDataset.data_dir = '{fewclue_dir}/tnews'",
      "adamw.learning_rate = 2e-3",
  ]
  defaults = dict(train_steps=20, global_batch_size=16, steps_per_loop=10,
                  checkpoint_every=10, seed=1)
  defaults.update(experiment)
  lines += [f"Experiment.{k} = {v!r}" for k, v in defaults.items()]
  return lines


def run(mode, model_dir, strategy, bindings, gin_files=()):
  """Runs the configured Experiment; its results plus "lines" (the progress
  output) and "experiment" (the built Experiment, for tests to inspect)."""
  configure(bindings, gin_files)
  lines = []
  experiment = experiment_lib.Experiment()  # pylint: disable=no-value-for-parameter
  results = experiment.run(mode, str(model_dir), strategy, print_fn=lines.append)
  results["lines"] = lines
  results["experiment"] = experiment
  return results


def weights(model):
  return [keras.ops.convert_to_numpy(v) for v in model.variables]


def write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_tiny_fashion_idx(directory, num_train=96, num_test=40):
  """Fashion-MNIST-shaped IDX files of a learnable toy problem: the class
  decides which rows of the image are bright."""
  rng = np.random.RandomState(0)
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", num_train), ("t10k", num_test)):
    labels = rng.randint(0, 10, n)
    images = rng.randint(0, 60, (n, 28, 28))
    for i, label in enumerate(labels):
      images[i, 2 * label:2 * label + 3] += 180
    write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
  return str(directory)


def main_command(gin_file, model_dir, idx_dir, *extra):
  """`python -m tfadv.main --mode=train` of `gin_file` on tiny Fashion-MNIST-shaped data."""
  params = tiny_fashion_bindings(idx_dir) + list(extra)
  return ([sys.executable, "-m", "tfadv.main", f"--gin_file={gin_file}",
           f"--model_dir={model_dir}", "--mode=train"]
          + [f"--gin_param={p}" for p in params])


def tiny_fashion_bindings(idx_dir):
  """Bindings over configs/fashion_mnist_*.gin for a CNN small enough for tests."""
  return [f"ImageDataset.data_dir = '{idx_dir}'", "ImageDataset.source = 'idx'",
          "small_cnn.filters = (4, 8)", "small_cnn.dense_units = 16",
          "Experiment.global_batch_size = 16", "Experiment.eval_batch_size = 20",
          "Experiment.train_epochs = 8", "Experiment.steps_per_loop = 8",
          "Experiment.checkpoint_every = 16"]


# --- text: a one-layer keras-hub BERT and batches of token ids ---------------

B, L, V, C = 4, 8, 40, 3


def tiny_bert(seed=0):
  keras.utils.set_random_seed(seed)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=V, num_layers=1, num_heads=2, hidden_dim=16,
      intermediate_dim=32, dropout=0.0, max_sequence_length=L)
  return keras_hub.models.BertTextClassifier(backbone, num_classes=C, dropout=0.0)


def batch_arrays(n=B, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, V, size=(n, L)).astype(np.int32)
  ids[:, 0] = 2
  ids[0, 3:5] = ids[0, 1]  # repeated tokens: duplicate gradient rows
  mask = np.ones((n, L), bool)
  mask[1, 6:] = False
  return {"token_ids": ids, "segment_ids": np.zeros((n, L), np.int32),
          "padding_mask": mask, "label": rng.randint(0, C, n).astype(np.int32)}


def split(batch):
  return {k: batch[k] for k in ("token_ids", "segment_ids", "padding_mask")}, batch["label"]


def loss_fn(global_batch=B):
  def fn(labels, logits, weights):
    per = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_sum(per * tf.cast(weights, per.dtype)) / global_batch
  return fn


def dense(g):
  return tf.convert_to_tensor(g).numpy()


def tiny_masked_model(seed=0):
  """(model, its embedding, its head): embedding (hidden 3) -> flatten -> tanh
  -> logits; padding positions still count."""
  keras.utils.set_random_seed(seed)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  mask = keras.Input((L,), dtype="bool", name="padding_mask")
  embedding = keras.layers.Embedding(V, 3, name="token_embedding")
  head = keras.Sequential([keras.layers.Flatten(),
                           keras.layers.Dense(5, activation="tanh"),
                           keras.layers.Dense(C)], name="head")
  model = keras.Model({"token_ids": ids, "padding_mask": mask}, head(embedding(ids)))
  return model, embedding, head


def text_inputs(arrays):
  """A batch's model inputs: its token ids and padding mask."""
  return {"token_ids": arrays["token_ids"], "padding_mask": arrays["padding_mask"]}


def tiny_masked_batch():
  """(model, embedding, head, inputs, labels, float mask) of tiny_masked_model
  and the tests' batch."""
  model, embedding, head = tiny_masked_model()
  arrays = batch_arrays()
  return (model, embedding, head, text_inputs(arrays), arrays["label"],
          arrays["padding_mask"].astype(np.float32))


def dropout_model(seed=0):
  """tiny_masked_model with dropout 0.5 after the embeddings and the hidden layer."""
  keras.utils.set_random_seed(seed)
  ids = keras.Input((L,), dtype="int32", name="token_ids")
  mask = keras.Input((L,), dtype="bool", name="padding_mask")
  x = keras.layers.Embedding(V, 3, name="token_embedding")(ids)
  x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
  x = keras.layers.Dropout(0.5)(keras.layers.Dense(5, activation="tanh")(x))
  return keras.Model({"token_ids": ids, "padding_mask": mask}, keras.layers.Dense(C)(x))


def dropout_state(model):
  """The model's dropout seed states (numpy): where its next training pass draws."""
  return [state.numpy() for state in random_state_variables(model)]


def rewound(model, step):
  """(step(), the dropout state it left), with the model's dropout seed states
  then put back as they were before it: a reference pass made by hand next
  draws the masks step's first training pass drew."""
  states = random_state_variables(model)
  start = dropout_state(model)
  out = step()
  after = dropout_state(model)
  for state, value in zip(states, start):
    state.assign(value)
  return out, after


# --- characters: a toy Chinese vocabulary for the character attack ---------

CHAR_CJK = list("中钟忠国果过行星航天田甜地第的得")
CHAR_VOCAB = list(SPECIAL_TOKENS) + ["a", "b", "1", "2", "，", "。"] + CHAR_CJK
CHAR_V, CHAR_H, CHAR_L, CHAR_N = len(CHAR_VOCAB), 4, 12, 24  # vocabulary, hidden, length, batch
FIRST_CJK = CHAR_VOCAB.index(CHAR_CJK[0])


def pooled_model(head, seed=0):
  """logits = head(Σ_i mask_i E[x_i]), E the model's `token_embedding` table;
  `head` maps the pooled tensor to logits (its layers built after E's)."""
  keras.utils.set_random_seed(seed)
  ids = keras.Input((CHAR_L,), dtype="int32", name="token_ids")
  mask = keras.Input((CHAR_L,), dtype="bool", name="padding_mask")
  embedded = keras.layers.Embedding(CHAR_V, CHAR_H, name="token_embedding")(ids)
  pooled = keras.layers.Lambda(lambda t: tf.reduce_sum(
      t[0] * tf.cast(t[1], t[0].dtype)[..., None], 1))([embedded, mask])
  return keras.Model({"token_ids": ids, "padding_mask": mask}, head(pooled))


def additive_model(seed=0):
  """logits = W·Σ_i mask_i E[x_i] + b: the effect of each position adds up, so
  the first-order gain is exact and greedy equals brute force (2 classes)."""
  return pooled_model(lambda pooled: keras.layers.Dense(2)(pooled), seed)


def char_texts(seed=0):
  """CHAR_N texts of CHAR_L ids: [CLS], random CJK characters, a comma and a
  Latin letter at fixed positions, every third text padded after 9 tokens."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(FIRST_CJK, CHAR_V, size=(CHAR_N, CHAR_L)).astype(np.int32)
  ids[:, 0] = CHAR_VOCAB.index("[CLS]")
  ids[:, 5] = CHAR_VOCAB.index("，")  # punctuation and a Latin letter stay as they are
  ids[:, 6] = CHAR_VOCAB.index("a")
  mask = np.ones((CHAR_N, CHAR_L), bool)
  mask[::3, 9:] = False  # padding
  ids[~mask] = 0
  return {"token_ids": ids, "padding_mask": mask}


def random_pinyin(seed=0, width=3):
  """A small same-sound table over the CJK ids (the test's, not pypinyin's)."""
  rng = np.random.RandomState(seed)
  table = np.full((CHAR_V, width), -1, np.int32)
  for index in range(FIRST_CJK, CHAR_V):
    others = [j for j in range(FIRST_CJK, CHAR_V) if j != index]
    table[index] = rng.choice(others, width, replace=False)
  return table


def per_example_ce(labels, logits):
  """Each example's cross-entropy of its logits."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


# --- images: a tiny CNN on 12x12 uint8 images ------------------------------------

IB, IH, IC = 8, 12, 4


def tiny_cnn(seed=0):
  keras.utils.set_random_seed(seed)
  return small_cnn((IH, IH, 1), IC, filters=(4, 8), dense_units=16)


def image_arrays(n=2 * IB, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, IH, IH, 1)).astype(np.uint8),
          "label": rng.randint(0, IC, n).astype(np.int32)}


def image_split(batch):
  return tf.cast(batch["image"], tf.float32) / 255.0, batch["label"]


# --- trainers ----------------------------------------------------------------------

def trainer(model_fn, method, split_batch, global_batch, strategy=None,
            optimizer_fn=None, input_shape=None, jit=False, **kwargs):
  """`tfadv.experiment.build_trainer` with the tests' defaults (Adam 1e-2)."""
  return build_trainer(model_fn, method, global_batch_size=global_batch,
                       strategy=strategy, split_batch=split_batch,
                       optimizer_fn=optimizer_fn or (lambda: keras.optimizers.Adam(1e-2)),
                       input_shape=input_shape, jit_compile=jit, **kwargs)


def train(trainer_, arrays, steps, global_batch, seed=3, replays=1):
  """`steps` steps of `trainer_` on `arrays`, shuffled with `seed`."""
  ds = distributed_dataset(trainer_.strategy, arrays, global_batch, shuffle=True,
                           seed=seed, repeats_per_batch=replays)
  return trainer_.train(iter(ds), steps)


# --- a synthetic ImageNet-format TFDS dataset (ArrayRecord) -----------------

def write_synthetic_imagenet(data_dir, num_train=64, num_validation=16, size=64,
                             num_classes=1000):
  """Prepares `synthetic_imagenet` in `data_dir` as ImageNet's TFDS builder
  lays it out: JPEG images of varying size (`Image(shape=(None, None, 3))`),
  1,000 class labels, "train" and "validation", in ArrayRecord format. Each
  image's class shows as a bright horizontal band. Returns `data_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(names=[f"n{i:08d}" for i in range(num_classes)]),
          }), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(num_train, 0),
              "validation": self._generate_examples(num_validation, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.RandomState(seed)
      for i in range(n):
        height, width = size + 8 * (i % 3), size + 16 * (i % 2)  # varying sizes
        label = int(rng.randint(0, 4))
        image = rng.randint(0, 80, (height, width, 3)).astype(np.uint8)
        image[label * height // 4:(label + 1) * height // 4] += 150
        yield i, {"image": image, "label": label}

  SyntheticImagenet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


HF_VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                              + list("今天天气很好不错我要退款怎么退货明下雨饿了打开空调关掉电视")))


def write_tiny_hf_bert(directory, vocab=HF_VOCAB, hidden=8, layers=2, heads=2,
                       intermediate=16, max_positions=64, seed=0, prefix="bert.",
                       model_type="bert"):
  """A Hugging Face-format BERT checkpoint as `save_pretrained` writes one
  (config.json, vocab.txt, tokenizer_config.json, model.safetensors with
  PyTorch's [out, in] Linear weights under a `bert.` prefix), random
  weights. Returns {name: array} of the weights written."""
  import json  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  rng = np.random.RandomState(seed)
  w = lambda *shape: (0.3 * rng.randn(*shape)).astype(np.float32)
  p, t = prefix, {}
  t[p + "embeddings.word_embeddings.weight"] = w(len(vocab), hidden)
  t[p + "embeddings.position_embeddings.weight"] = w(max_positions, hidden)
  t[p + "embeddings.token_type_embeddings.weight"] = w(2, hidden)
  t[p + "embeddings.LayerNorm.weight"] = 1 + w(hidden)
  t[p + "embeddings.LayerNorm.bias"] = w(hidden)
  for i in range(layers):
    q = f"{p}encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      t[q + name + ".weight"], t[q + name + ".bias"] = w(hidden, hidden), w(hidden)
    t[q + "intermediate.dense.weight"] = w(intermediate, hidden)
    t[q + "intermediate.dense.bias"] = w(intermediate)
    t[q + "output.dense.weight"], t[q + "output.dense.bias"] = w(hidden, intermediate), w(hidden)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[q + name + ".weight"], t[q + name + ".bias"] = 1 + w(hidden), w(hidden)
  t[p + "pooler.dense.weight"], t[p + "pooler.dense.bias"] = w(hidden, hidden), w(hidden)
  save_file(t, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": model_type, "architectures": ["BertForMaskedLM"],
               "vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": layers,
               "num_attention_heads": heads, "intermediate_size": intermediate,
               "max_position_embeddings": max_positions, "type_vocab_size": 2,
               "hidden_act": "gelu", "layer_norm_eps": 1e-12}, f)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  return t


class TinyPairs(TextDataset):
  """Sentence pairs in memory, labelled "a", "b", "a", ...: train = eval."""

  name = "tiny_pairs"

  def __init__(self, pairs):
    self.pairs = list(pairs)

  def label_names(self):
    return ["a", "b"]

  def examples(self, split):
    self.check_split(split)
    return self.pairs, ["ab"[i % 2] for i in range(len(self.pairs))]
