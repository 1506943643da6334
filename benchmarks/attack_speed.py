"""Evaluation speed under the character-substitution attack vs clean evaluation, in one process.

    .venv/bin/python benchmarks/attack_speed.py [--jit] [--budget 2 --top_k 8 ...]

The same keras-hub BERT (random weights, a synthetic character vocabulary of
CJK characters) is evaluated through the same `Trainer`, once clean and once
with `Experiment.eval_attacks = {"sub": CharSubstitutionAttack(...)}`; each
is timed over `--batches` evaluation batches after a warm-up pass (which
traces and compiles), best of `--repeats`. Reported: examples/s of each and
the attacked evaluation's slowdown (clean examples/s ÷ attacked examples/s).

Expected cost per example (forward 1, backward to the inputs ≈ 1): the clean
pass 1, then per round a gradient pass (≈ 2) and `top_k` verified texts
(top_k forwards), plus the candidates' distances to the vocabulary (one
[length × vocabulary × hidden] product): about 1 + B·(2 + top_k) ≈ 21
forward passes for B = 2, top_k = 8, fewer when examples stop early (a
random model's predictions flip easily, so measure a trained one too).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from nlp_step_time import add_model_arguments, make_backbone  # pylint: disable=g-import-not-at-top
from tfadv.attacks.char_substitution import CharSubstitutionAttack
from tfadv.data.pipeline import distributed_dataset
from tfadv.data.vocab import SPECIAL_TOKENS
from tfadv.experiment import build_trainer
import keras_hub  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  add_model_arguments(parser, length=48)  # TNEWS's sequence length
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--budget", type=int, default=2)
  parser.add_argument("--top_k", type=int, default=8)
  parser.add_argument("--jit", action="store_true", help="XLA-compile the evaluation step")
  args = parser.parse_args()

  vocabulary = list(SPECIAL_TOKENS) + [chr(0x4E00 + i) for i in range(args.vocab - 5)]
  rng = np.random.RandomState(0)
  n = args.batch * args.batches
  ids = rng.randint(5, args.vocab, size=(n, args.length)).astype(np.int32)
  ids[:, 0] = 2
  arrays = {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": np.ones_like(ids, bool),
            "label": rng.randint(0, args.classes, n).astype(np.int32)}
  print(f"BERT {args.layers}x{args.hidden}, vocab {args.vocab}, batch {args.batch} x "
        f"{args.length} tokens, budget {args.budget}, top_k {args.top_k}, "
        f"jit_compile={args.jit}, {os.cpu_count()} CPUs, TF {tf.__version__}")
  speeds = {}
  for name, attacks in (("clean", {}), ("attacked", {"sub": CharSubstitutionAttack(
      budget=args.budget, max_fraction=1.0, top_k=args.top_k)})):
    for attack in attacks.values():
      attack.set_vocabulary(vocabulary)
    trainer = build_trainer(
        lambda: keras_hub.models.BertTextClassifier(make_backbone(args),
                                                    num_classes=args.classes),
        None, global_batch_size=args.batch, eval_attacks=attacks,
        eval_jit_compile=args.jit,
        split_batch=lambda b: ({k: b[k] for k in ("token_ids", "segment_ids", "padding_mask")},
                               b["label"]))

    def evaluate():
      dataset = distributed_dataset(trainer.strategy, arrays, args.batch, shuffle=False)
      return trainer.evaluate(iter(dataset), args.batches)

    metrics = evaluate()  # traces, compiles
    best = float("inf")
    for _ in range(args.repeats):
      start = time.perf_counter()
      evaluate()
      best = min(best, time.perf_counter() - start)
    speeds[name] = n / best
    extra = "".join(f", {k} {v:.3g}" for k, v in metrics.items() if "sub" in k)
    print(f"{name:9s} {speeds[name]:9.1f} examples/s{extra}", flush=True)
  print(f"attacked evaluation: {speeds['clean'] / speeds['attacked']:.1f}x slower than clean")


if __name__ == "__main__":
  main()
