"""The record store's input path against the in-memory one: throughput and memory.

    .venv/bin/python benchmarks/input_pipeline.py --throughput [--jit]
    .venv/bin/python benchmarks/input_pipeline.py --memory --store=/tmp/big --store_mb=400

--throughput: in one process, examples/s of the same training step fed from
memory (`ArraySource`) and from a record store on local disk in each layout
("array_record" and "fixed", `RecordSource`), for Madry's CNN on 60,000 Fashion-MNIST-shaped images and
for the small BERT of `nlp_step_time.py` on 128-token rows; and the input
pipeline's own rate (batches drawn with no step). Best of --repeats loops
after a warm-up, as `timing.best_step_time`. Target: records ≥ 0.9× memory.

--memory: writes a store of --store_mb MB of 64×64×3 uint8 images in a child
process, then, in two more children, trains a linear classifier for one
epoch (every row read once) from the store and from memory, and reports
each child's peak RSS growth over its RSS just before the data source was
made (after a warm-up step on 64 rows had traced the step). The last line
is JSON, for `tests/test_records.py`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

IMAGE_SHAPE = (64, 64, 3)


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_big_store(store: str, store_mb: int) -> None:
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  rows = store_mb * 2**20 // int(np.prod(IMAGE_SHAPE)) + 1

  def arrays():
    rng = np.random.RandomState(0)
    return {"image": rng.randint(0, 256, (rows,) + IMAGE_SHAPE).astype(np.uint8),
            "label": rng.randint(0, 10, rows).astype(np.int32)}
  records.write_store(store, {"train": arrays}, shard_bytes=64 << 20)


def train_one_epoch(store: str, source_kind: str, batch: int) -> dict:
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  from tfadv.data.pipeline import distributed_dataset  # pylint: disable=g-import-not-at-top
  from tfadv.experiment import build_trainer  # pylint: disable=g-import-not-at-top

  def split(b):
    return tf.cast(b["image"], tf.float32) / 255.0, b["label"]
  trainer = build_trainer(
      lambda: keras.Sequential([keras.Input(IMAGE_SHAPE), keras.layers.Flatten(),
                                keras.layers.Dense(10)]),
      global_batch_size=batch, split_batch=split)
  warm = {"image": np.zeros((64,) + IMAGE_SHAPE, np.uint8), "label": np.zeros(64, np.int32)}
  trainer.train(iter(distributed_dataset(trainer.strategy, warm, batch, shuffle=True)), 2)
  before = rss_mb()
  source = records.RecordSource(store, "train")
  rows = source.num_examples
  if source_kind == "memory":  # what a task's arrays would hold
    from tfadv.data.sources import ArraySource  # pylint: disable=g-import-not-at-top
    source = ArraySource(source.head(rows))
  steps = -(-rows // batch)
  start = time.perf_counter()
  trainer.train(iter(distributed_dataset(trainer.strategy, source, batch, shuffle=True,
                                         seed=1)), steps)
  return {"source": source_kind, "rows": rows, "steps": steps, "batch": batch,
          "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
          "rss_growth_mb": round(peak_rss_mb() - before, 1),
          "seconds": round(time.perf_counter() - start, 1)}


def memory(args) -> dict:
  def child(*flags):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *flags],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f"child {flags} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
  if not os.path.exists(os.path.join(args.store, "metadata.json")):
    child("--phase=write", f"--store={args.store}", f"--store_mb={args.store_mb}")
  store_bytes = sum(os.path.getsize(os.path.join(args.store, f))
                    for f in os.listdir(args.store))
  report = {"store_mb": round(store_bytes / 2**20, 1)}
  for kind in ("records", "memory"):
    result = json.loads(child("--phase=train", f"--source={kind}", f"--store={args.store}",
                              f"--batch={args.batch}"))
    report.update({k: result[k] for k in ("rows", "steps", "batch")})
    report[f"{kind}_rss_growth_mb"] = result["rss_growth_mb"]
    report[f"{kind}_seconds"] = result["seconds"]
  return report


def throughput(args) -> None:
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import keras_hub  # pylint: disable=g-import-not-at-top
  from nlp_step_time import add_model_arguments, make_backbone  # pylint: disable=g-import-not-at-top
  from timing import best_step_time  # pylint: disable=g-import-not-at-top
  from tfadv.data import records  # pylint: disable=g-import-not-at-top
  from tfadv.data.pipeline import distributed_dataset  # pylint: disable=g-import-not-at-top
  from tfadv.experiment import build_trainer  # pylint: disable=g-import-not-at-top
  from tfadv.models.vision import small_cnn  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  cases = {
      "madry_cnn": dict(
          arrays={"image": rng.randint(0, 256, (60000, 28, 28, 1)).astype(np.uint8),
                  "label": rng.randint(0, 10, 60000).astype(np.int32)},
          model=lambda: small_cnn((28, 28, 1), 10), batch=args.cnn_batch,
          split=lambda b: (tf.cast(b["image"], tf.float32) / 255.0, b["label"]),
          steps=args.steps),
  }
  parser = argparse.ArgumentParser()
  add_model_arguments(parser)
  bert_args = parser.parse_args([])
  n = 10000
  ids = rng.randint(5, bert_args.vocab, (n, bert_args.length)).astype(np.int32)
  cases["small_bert"] = dict(
      arrays={"token_ids": ids, "segment_ids": np.zeros_like(ids),
              "padding_mask": np.ones_like(ids, bool),
              "label": rng.randint(0, bert_args.classes, n).astype(np.int32)},
      model=lambda: keras_hub.models.BertTextClassifier(
          make_backbone(bert_args), num_classes=bert_args.classes, preprocessor=None),
      batch=bert_args.batch, steps=args.bert_steps,
      split=lambda b: ({k: b[k] for k in ("token_ids", "segment_ids", "padding_mask")},
                       b["label"]))
  print(f"{os.cpu_count()} CPUs, TF {tf.__version__}, jit_compile={args.jit}")
  results = {}
  for name, case in cases.items():
    store = tempfile.mkdtemp(prefix=f"tfadv_bench_{name}_")
    records.write_store(os.path.join(store, "s"), {"train": case["arrays"]})
    records.write_store(os.path.join(store, "f"), {"train": case["arrays"]}, layout="fixed")
    sources = {"memory": case["arrays"],
               "records": records.RecordSource(os.path.join(store, "s"), "train"),
               "fixed": records.RecordSource(os.path.join(store, "f"), "train")}
    # The input pipeline alone: batches drawn, no step.
    for kind, source in sources.items():
      iterator = iter(distributed_dataset(tf.distribute.get_strategy(), source,
                                          case["batch"], shuffle=True, seed=1))
      for _ in range(5):
        next(iterator)
      best = float("inf")
      for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.input_batches):
          next(iterator)
        best = min(best, (time.perf_counter() - start) / args.input_batches)
      results[f"{name}/input_only/{kind}"] = case["batch"] / best
    for kind, source in sources.items():
      keras.utils.set_random_seed(0)
      trainer = build_trainer(case["model"], global_batch_size=case["batch"],
                              split_batch=case["split"], jit_compile=args.jit)
      iterator = iter(distributed_dataset(trainer.strategy, source, case["batch"],
                                          shuffle=True, seed=1))
      seconds = best_step_time(trainer, iterator, case["steps"], args.repeats)
      results[f"{name}/train/{kind}"] = case["batch"] / seconds
    for part in ("input_only", "train"):
      memory_rate = results[f"{name}/{part}/memory"]
      line = f"{name:11s} {part:10s} memory {memory_rate:9.1f} ex/s"
      for kind in ("records", "fixed"):
        rate = results[f"{name}/{part}/{kind}"]
        line += f" | {kind} {rate:9.1f} ex/s ({rate / memory_rate:5.3f}x)"
      print(line)
  print(json.dumps({k: round(v, 1) for k, v in results.items()}))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--throughput", action="store_true")
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--phase", choices=["write", "train"])
  parser.add_argument("--source", choices=["records", "memory"])
  parser.add_argument("--store", default="/tmp/tfadv_big_store")
  parser.add_argument("--store_mb", type=int, default=400)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--cnn_batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=30, help="CNN steps per timed loop")
  parser.add_argument("--bert_steps", type=int, default=8, help="BERT steps per timed loop")
  parser.add_argument("--input_batches", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--jit", action="store_true")
  args = parser.parse_args()
  if args.phase == "write":
    write_big_store(args.store, args.store_mb)
  elif args.phase == "train":
    print(json.dumps(train_one_epoch(args.store, args.source, args.batch)))
  elif args.memory:
    print(json.dumps(memory(args)))
  elif args.throughput:
    throughput(args)
  else:
    parser.error("pass --throughput or --memory")


if __name__ == "__main__":
  main()
