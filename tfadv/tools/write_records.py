"""Writes a task's examples as a record store (ArrayRecord shards).

    python -m tfadv.tools.write_records --gin_file=configs/tnews_fgm.gin --out=DIR
    python -m tfadv.main --gin_file=configs/tnews_fgm.gin \\
        --gin_param="Experiment.record_store='DIR'"

The task of the config prepares itself into DIR (its labels.json, a
vocabulary: what a run then copies into its model dir), and each of its
splits is written as the task's `source` gives it (tokenized text, uint8
images; a TFDS dataset's encoded images, streamed in chunks, never held
whole), so training on the store gives the same weights as training in
memory. `--layout=fixed` writes rows TensorFlow reads by itself (for TPU
pod slices, whose input pipelines run without Python; gs:// directly).
`--out` may be `gs://` (written locally, then copied). Your own
data: a `Task` (or a `tfadv.data.base` dataset under an existing task) and a
gin file naming it; or `tfadv.data.records.write_store` from arrays.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top
import gin

from tfadv import main as tfadv_main

FLAGS = flags.FLAGS  # --gin_file and --gin_param: tfadv.main's flags
flags.DEFINE_string("out", None, "The store's directory (local or gs://).")
flags.DEFINE_list("splits", None, "Splits to write (default: the task's).")
flags.DEFINE_integer("shard_mb", 256, "About this many MB of rows per shard.")
flags.DEFINE_list("encode_png", [], "Features (uint8 images) stored as PNG "
                  "instead of raw bytes.")
flags.DEFINE_enum("layout", "array_record", ["array_record", "fixed"],
                  "array_record: ArrayRecord shards (read through Python); fixed: "
                  "fixed-length rows read by TensorFlow ops alone (TPU pod slices, "
                  "gs:// directly; raw features and at most one variable-length string).")


def write(task, out: str, splits=None, shard_bytes: int = 256 << 20, encode_png=(),
          description: str = "", layout: str = "array_record") -> str:
  """Prepares `task` into `out` and writes its splits there; returns `out`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  records.check_new_store(out)  # before `prepare` writes anything there
  before = set(tf.io.gfile.listdir(out)) if tf.io.gfile.isdir(out) else set()
  task.prepare(out)
  prepared = sorted(set(tf.io.gfile.listdir(out)) - before)
  prepared = [p.rstrip("/") for p in prepared if not tf.io.gfile.isdir(os.path.join(out, p))]
  splits = list(splits or task.splits)
  return records.write_store(
      out, {split: (lambda split=split: task.source(split)) for split in splits},
      encodings={k: "png" for k in encode_png}, shard_bytes=shard_bytes,
      description=description, prepared=prepared, layout=layout,
      signature=task.store_signature())


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("Pass --out=DIR (where the store goes).")
  try:
    tfadv_main.parse_config(FLAGS.gin_file, FLAGS.gin_param)
  except tfadv_main.ConfigError as e:
    print(f"tfadv: config error: {e}", file=sys.stderr)
    sys.exit(2)
  from tfadv import errors, experiment  # pylint: disable=g-import-not-at-top
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  start = time.time()
  try:
    task = experiment.Experiment().task
    write(task, FLAGS.out, FLAGS.splits, FLAGS.shard_mb << 20, FLAGS.encode_png,
          description=gin.config_str(), layout=FLAGS.layout)
  except (errors.MissingInputError, errors.InputDataError) as e:
    print(f"tfadv: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    sys.exit(2)
  metadata = records.read_metadata(FLAGS.out)
  for split, info in metadata["splits"].items():
    files = (f"{len(info['shards'])} shard(s)" if "shards" in info
             else f"{info['blocks']} block(s)")
    print(f"{split}: {info['num_examples']} rows in {files}")
  print(f"Wrote {FLAGS.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
