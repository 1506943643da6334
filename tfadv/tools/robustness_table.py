"""The robustness table: plain training, FGSM-RS, PGD-7 and Free-m on Fashion-MNIST.

    python -m tfadv.tools.robustness_table --out_dir=docs \\
        --work_dir=runs/robustness_table

Each row is `python -m tfadv.main --gin_file=configs/fashion_mnist_<method>.gin`
in its own process; evaluation reports clean, FGSM and PGD-20 accuracy on the
test split. The tool writes its section of `<out_dir>/results.md` (clean
accuracy, PGD-20 accuracy, wall time per row, and the checks of Shafahi et
al.'s claims) and `<out_dir>/results_vision.png` (robust accuracy against
training time). Finished runs are read back, not repeated.
"""

import os
import platform

from absl import app, flags

from tfadv.tools import runs

FLAGS = flags.FLAGS
# The robust column: per example, the worst case over the evaluation attacks.
ROBUST = "accuracy_worst_case"
flags.DEFINE_string("out_dir", "docs", "Where results.md and the plot go.")
flags.DEFINE_string("work_dir", "runs/robustness_table", "Model dirs of the runs.")
flags.DEFINE_string("config_dir", "configs", "Where fashion_mnist_<method>.gin live.")
flags.DEFINE_list("methods", ["plain", "fgsm", "pgd7", "free4", "free8"],
                  "Rows: configs/fashion_mnist_<method>.gin.")
flags.DEFINE_list("seeds", ["0"], "Seeds of every row.")
flags.DEFINE_multi_string("gin_param", [], "Extra bindings for every run.")


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for i, (method, records) in enumerate(rows.items()):
    minutes = [r["train_seconds"] / 60 for r in records]
    axes[0].scatter(minutes, [100 * r[ROBUST] for r in records],
                    color=f"C{i}", label=method, s=40)
    axes[1].scatter(minutes, [100 * r["accuracy"] for r in records], color=f"C{i}",
                    label=method, s=40)
  for ax, what in zip(axes, ("robust accuracy (%, worst case)", "clean accuracy (%)")):
    ax.set_xlabel("training time (min)")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("Fashion-MNIST test, ε = 0.1 (ℓ∞)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def claims(rows):
  """Shafahi et al.'s claims, checked on the measured means."""
  def mean(method, key):
    return runs.mean_std(r[key] for r in rows[method])[0]
  lines = []
  if "plain" in rows:
    lines.append(f"- Plain training robust (worst case): {100 * mean('plain', ROBUST):.1f}% "
                 "(claim: near 0%).")
  if "pgd7" in rows:
    pgd_acc, pgd_time = mean("pgd7", ROBUST), mean("pgd7", "train_seconds")
    for method in rows:
      if method.startswith("free"):
        acc = mean(method, ROBUST)
        gap = 100 * (pgd_acc - acc)
        ratio = mean(method, "train_seconds") / pgd_time
        verdict = "holds" if gap <= 3 and ratio <= 0.25 else "does not hold"
        lines.append(f"- {method}: robust accuracy {100 * acc:.2f}% vs PGD-7's "
                     f"{100 * pgd_acc:.2f}% (PGD-7 minus {method}: {gap:+.2f} points), "
                     f"training time {ratio:.3f}× PGD-7's (claim: within ~3 points at "
                     f"≤ 0.25×): {verdict} here.")
  return lines


def main(argv):
  del argv
  rows, finished = {}, []
  planned = [(method, seed) for method in FLAGS.methods for seed in FLAGS.seeds]
  for i, (method, seed) in enumerate(planned, 1):
    run = runs.Run(f"fashion_mnist_{method}_seed{seed}",
                   os.path.join(FLAGS.config_dir, f"fashion_mnist_{method}.gin"),
                   [f"Experiment.seed = {seed}"] + FLAGS.gin_param, FLAGS.work_dir)
    record = run.result("test")
    print(f"[{i}/{len(planned)}] {run.name}: clean {100 * record['accuracy']:.2f}% "
          f"PGD-20 {100 * record['accuracy_pgd20']:.2f}% robust {100 * record[ROBUST]:.2f}% ({record['wall_seconds']:.0f} s)",
          flush=True)
    rows.setdefault(method, []).append(record)
    finished.append((method, seed, record))
  total = sum(r["wall_seconds"] for *_, r in finished)
  lines = ["## Vision: Fashion-MNIST, plain vs FGSM-RS vs PGD-7 vs Free-m", "",
           "Produced by (from the repository root):", "", "```",
           runs.command_line("tfadv.tools.robustness_table"), "```", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
           f"Whole table: {total / 60:.1f} min of wall time. Test accuracy (%) on the "
           "evaluated test images; PGD-20: ℓ∞ ε = 0.1, step 0.025, random start; "
           "APGD-CE and APGD-DLR: 100 iterations each (Croce & Hein 2020); **robust**: "
           "the images no attack breaks (per-example worst case over FGSM, PGD-20 "
           "and both APGDs), the column the claims below use. "
           "Training time is the training loop alone; wall time is the whole "
           "process (start-up, training, robust evaluation).", "",
           "| method | seed | steps | clean | FGSM | PGD-20 | APGD-CE | APGD-DLR | robust "
           "| training time | wall time (with eval) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for method, seed, r in finished:
    worst = lambda k: f"{100 * r[k]:.2f}" if k in r else "–"
    lines.append(f"| {method} | {seed} | {r['step']} | {100 * r['accuracy']:.2f} | "
                 f"{100 * r['accuracy_fgsm']:.2f} | {100 * r['accuracy_pgd20']:.2f} | "
                 f"{worst('accuracy_apgd_ce')} | {worst('accuracy_apgd_dlr')} | "
                 f"**{worst('accuracy_worst_case')}** | "
                 f"{r.get('train_seconds', float('nan')) / 60:.2f} min | "
                 f"{r['wall_seconds'] / 60:.2f} min |")
  lines += ["", "![robustness table](results_vision.png)", ""] + claims(rows)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  runs.replace_section(os.path.join(FLAGS.out_dir, "results.md"), "vision-robustness-table",
                       "\n".join(lines))
  plot(rows, os.path.join(FLAGS.out_dir, "results_vision.png"))
  print(f"Wrote {FLAGS.out_dir}/results.md and results_vision.png ({total / 60:.1f} min of runs).")


if __name__ == "__main__":
  app.run(main)
