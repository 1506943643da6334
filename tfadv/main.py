"""Command-line entry point.

    python -m tfadv.main --gin_file=configs/demo.gin [--gin_param=...]
        [--model_dir=...] [--mode=train_and_evaluate]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

from tfadv.config import ConfigError, parse_config  # pylint: disable=g-import-not-at-top,unused-import

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings (repeatable), e.g. "
                          "'Experiment.train_steps = 100'.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, summaries, the "
                    "operative config and exports go; default "
                    "runs/<first gin file's name>.")
flags.DEFINE_enum("mode", "train_and_evaluate",
                  ["train", "evaluate", "train_and_evaluate", "export"],
                  "What to do.")
flags.DEFINE_string("tpu", None, "TPU name or address (implies "
                    "make_strategy.kind='tpu'); 'local' on a TPU VM.")


def default_model_dir(gin_files) -> str:
  name = os.path.splitext(os.path.basename(gin_files[0]))[0] if gin_files else "run"
  return os.path.join("runs", name)


def main(argv):
  del argv
  if not FLAGS.gin_file and not FLAGS.gin_param:
    raise app.UsageError("Pass --gin_file=configs/<experiment>.gin.")
  try:
    parse_config(FLAGS.gin_file, FLAGS.gin_param)
  except ConfigError as e:
    logging.error("%s", e)
    print(f"tfadv: config error: {e}", file=sys.stderr)
    sys.exit(2)
  # Strategy first: splitting the CPU must happen before TensorFlow starts.
  from tfadv import distribute, experiment  # pylint: disable=g-import-not-at-top
  bindings = {}
  if FLAGS.tpu is not None:
    bindings = {"kind": "tpu", "tpu": FLAGS.tpu}
  strategy = distribute.make_strategy(**bindings)
  model_dir = FLAGS.model_dir or default_model_dir(FLAGS.gin_file)
  logging.info("Model dir: %s; strategy %s with %d replicas.", model_dir,
               type(strategy).__name__, strategy.num_replicas_in_sync)
  from tfadv import errors, preemption  # pylint: disable=g-import-not-at-top
  try:
    results = experiment.run(FLAGS.mode, model_dir, strategy)
  except preemption.Preempted as e:
    print(f"tfadv: {e}", flush=True)
    sys.exit(preemption.EXIT_CODE)
  except (errors.MissingInputError, errors.InputDataError, errors.SettingError) as e:
    # One line: gin appends "In call to configurable ..." on lines of its own.
    print(f"tfadv: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    sys.exit(2)
  if "eval" in results:
    name = results["accuracy_name"]
    print(f"final eval {name.replace('_', ' ')}: {results['eval'][name]:.4f}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
