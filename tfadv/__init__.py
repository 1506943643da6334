"""tfadv: adversarial training for TensorFlow 2 / Keras 3.

The package is organised as small pieces with one job each:

* `tfadv.data`: readers (CLUE JSON lines, embedded demo reviews) and
  tokenized, step-indexed input pipelines.
* `tfadv.models`: model factories (keras-hub BERT classifiers).
* `tfadv.methods`: adversarial training methods behind one interface.
* `tfadv.trainer`: the per-step runner (`train(num_steps)`,
  `evaluate(num_steps)`) run under any `tf.distribute` strategy.
* `tfadv.controller`: the outer loop, checkpoints, summaries, progress.
* `tfadv.experiment`: the gin-configured assembly used by `tfadv.main`.
"""

__version__ = "0.1.0"
