"""The methods table: plain training, FGM and GP on FewCLUE TNEWS and IFLYTEK, over seeds.

    python -m tfadv.tools.methods_table --data_dir=../shared/data/fewclue \\
        --out_dir=docs --work_dir=runs/methods_table

Each run is `python -m tfadv.main --gin_file=configs/<task>_<method>.gin` in
its own process (one clean gin and TensorFlow state per run), trained on the
task's train split and evaluated on dev. A run whose model dir already holds
`eval_results.json` is read back, not repeated, so a killed table resumes
where it stopped. The tool writes its section of `<out_dir>/results.md` (mean ± std
per method and task, every run with its wall time, the command) and
`<out_dir>/results_text.png`.

`--sweep=fgm:0.1,0.3,3` adds rows for other ε values of a method (on
`--sweep_seeds`; `--sweep=gp@iflytek:0.1` on named tasks only), for when the
configs' ε does not help at this scale.

`--select=fgm_output:0.3,1,3` chooses a method's ε on dev before the table
runs: each ε is trained on `--select_tasks` with `--select_seeds` (seeds the
table does not report), the ε with the best mean dev accuracy (the smaller on
a tie) is used for that method's rows on every task, and the section shows
the selection runs.

`--preset=runs/pretrain_mlm_zh/preset` fine-tunes every run from a keras-hub
preset (e.g. the one `configs/pretrain_mlm_zh.gin` writes) and writes its
own section and plot (`results_text_pretrained.png`); `--jobs=2` runs two
runs at a time, each pinned to its own CPU core when there are enough.
"""

import concurrent.futures
import os
import platform
import queue
import time

from absl import app, flags

from tfadv.tools import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/data/fewclue", "FewCLUE directory "
                    "holding tnews/ and iflytek/.")
flags.DEFINE_string("out_dir", "docs", "Where results.md and results.png go.")
flags.DEFINE_string("work_dir", "runs/methods_table", "Model dirs of the runs.")
flags.DEFINE_string("config_dir", "configs", "Where <task>_<method>.gin live.")
flags.DEFINE_list("tasks", ["tnews", "iflytek"], "Tasks (rows).")
flags.DEFINE_list("methods", ["plain", "fgm", "gp"], "Methods (columns).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every task x method.")
flags.DEFINE_multi_string("sweep", [], "method[@task,...]:eps1,eps2,... extra ε "
                          "rows (on --sweep_tasks, or the tasks after @).")
flags.DEFINE_list("sweep_seeds", ["0", "1", "2"], "Seeds of the sweep rows.")
flags.DEFINE_list("sweep_tasks", None, "Tasks of the sweep rows (default: --tasks).")
flags.DEFINE_multi_string("select", [], "method:eps1,eps2,... chooses the method's "
                          "ε by dev accuracy on --select_tasks / --select_seeds "
                          "before the table runs.")
flags.DEFINE_list("select_tasks", ["tnews"], "Tasks the ε selection trains on.")
flags.DEFINE_list("select_seeds", ["100"], "Seeds of the ε selection runs (keep "
                  "them apart from --seeds).")
flags.DEFINE_multi_string("gin_param", [], "Extra bindings for every run.")
flags.DEFINE_multi_string("task_gin_param", [], "task:binding, a binding for one "
                          "task's runs only, e.g. 'iflytek:Experiment.train_steps = 400'.")
flags.DEFINE_string("preset", None, "keras-hub preset (name or directory) that "
                    "every run fine-tunes from.")
flags.DEFINE_integer("jobs", 1, "Runs at a time.")

# The ε binding of each method; the step sizes of the iterative methods scale
# with ε (the ratios of their configs).
EPSILON_BINDING = {"fgm": "EmbeddingFGM.epsilon", "gp": "EmbeddingGradientPenalty.epsilon",
                   "fgm_output": "EmbeddingOutputFGM.epsilon",
                   "pgd_output": "EmbeddingOutputPGD.epsilon", "freelb": "FreeLB.epsilon"}
STEP_BINDING = {"pgd_output": ("EmbeddingOutputPGD.step_size", 0.5),
                "freelb": ("FreeLB.step_size", 0.4)}
TASK_TITLES = {"tnews": "TNEWS", "iflytek": "IFLYTEK"}


class NlpRun(runs.Run):
  """One (task, method, ε, seed) run of configs/<task>_<method>.gin."""

  def __init__(self, task, method, seed, epsilon=None, selected=False):
    self.task, self.method, self.seed, self.epsilon = task, method, int(seed), epsilon
    self.selected = selected  # ε chosen on dev: the method's own row
    eps = "" if epsilon is None else f"_eps{epsilon:g}"
    params = [f"Experiment.seed = {self.seed}",
              f"ClueDataset.data_dir = '{os.path.join(FLAGS.data_dir, task)}'"]
    if epsilon is not None:
      params.append(f"{EPSILON_BINDING[method]} = {epsilon}")
      if method in STEP_BINDING:
        binding, ratio = STEP_BINDING[method]
        params.append(f"{binding} = {ratio * epsilon:g}")
    if FLAGS.preset:
      params.append(f"TextClassificationTask.preset = '{FLAGS.preset}'")
    super().__init__(f"{task}_{method}{eps}_seed{self.seed}",
                     os.path.join(FLAGS.config_dir, f"{task}_{method}.gin"),
                     params + FLAGS.gin_param + task_bindings(task), FLAGS.work_dir)

  @property
  def variant(self) -> str:
    if self.epsilon is None or self.selected:
      return self.method
    return f"{self.method} ε={self.epsilon:g}"


def task_bindings(task: str):
  """The --task_gin_param bindings of `task`."""
  bindings = []
  for spec in FLAGS.task_gin_param:
    name, sep, binding = spec.partition(":")
    if not sep or not binding.strip():
      raise app.UsageError(f"--task_gin_param={spec!r}: expected TASK:binding.")
    if name.strip() == task:
      bindings.append(binding.strip())
  return bindings


def parse_epsilons(spec: str, flag: str):
  return runs.parse_method_values(spec, flag, sorted(EPSILON_BINDING))


def plot(groups, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(dict.fromkeys(task for task, _ in groups))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    variants = [v for t, v in groups if t == task]
    for i, variant in enumerate(variants):
      accs = [100 * r["accuracy"] for r in groups[(task, variant)]]
      mean, std = runs.mean_std(accs)
      ax.bar(i, mean, yerr=std, capsize=4, color=f"C{i}", alpha=0.7)
      ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_title(f"FewCLUE {TASK_TITLES.get(task, task)} dev")
    ax.set_ylabel("accuracy (%)")
    lows = [100 * r["accuracy"] for v in variants for r in groups[(task, v)]]
    ax.set_ylim(max(0, min(lows) - 5), max(lows) + 3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_markdown(groups, finished, selection, chosen, total_seconds, elapsed_seconds,
                   path):
  tasks = list(dict.fromkeys(task for task, _ in groups))
  variants = list(dict.fromkeys(v for _, v in groups))
  title = "## Text: FewCLUE TNEWS and IFLYTEK (plain, FGM, GP)"
  if FLAGS.preset:
    title = ("## Text: FewCLUE TNEWS and IFLYTEK, fine-tuned from the locally "
             f"pretrained preset (`{FLAGS.preset}`)")
  lines = [title, "",
           "Produced by (from the repository root, FewCLUE beside it as WORKSPACE.md describes):", "",
           "```", runs.command_line("tfadv.tools.methods_table"), "```", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
           f"Python {platform.python_version()}. Whole table: {total_seconds / 60:.1f} min "
           f"of wall time summed over {len(finished) + len(selection)} runs, "
           f"{elapsed_seconds / 60:.1f} min elapsed in this invocation with --jobs={FLAGS.jobs} "
           "(runs read back from an earlier one count 0).", "",
           "Dev accuracy (%), mean ± sample std over seeds (n = number of seeds); "
           "in brackets the difference from plain training's mean:", "",
           "| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |",
           "|---" * (len(tasks) + 1) + "|"]
  for variant in variants:
    cells = []
    for task in tasks:
      records = groups.get((task, variant))
      if not records:
        cells.append("")
        continue
      mean, std = runs.mean_std([100 * r["accuracy"] for r in records])
      cell = f"{mean:.2f} ± {std:.2f} (n={len(records)})"
      baseline = groups.get((task, "plain"))
      if baseline and variant != "plain":
        cell += f" [{mean - runs.mean_std([100 * r['accuracy'] for r in baseline])[0]:+.2f}]"
      cells.append(cell)
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  if chosen:
    lines += ["", "ε of each method, chosen on dev before the table ran: " + "; ".join(
        f"{method} ε = {epsilon:g}" for method, epsilon in chosen.items()) + "."]
  lines += ["", f"![methods table]({_plot_name()})", ""]
  if selection:
    lines += ["ε selection (dev accuracy of each candidate; the chosen ε is "
              "marked; these seeds are not in the table):", ""]
    lines += _run_rows([(run, record, run.epsilon == chosen.get(run.method))
                        for run, record in selection], variant=lambda run: (
                            f"{run.method} ε={run.epsilon:g}"))
    lines.append("")
  lines += ["Every run of the table:", ""]
  lines += _run_rows([(run, record, False) for run, record in finished],
                     variant=lambda run: run.variant)
  section = "text-methods-table-pretrained" if FLAGS.preset else "text-methods-table"
  runs.replace_section(path, section, "\n".join(lines))


def _run_rows(rows, variant):
  lines = ["| task | method | seed | dev accuracy | dev loss | steps | wall time |",
           "|---|---|---|---|---|---|---|"]
  for run, record, mark in rows:
    lines.append(f"| {run.task} | {variant(run)}{' (chosen)' if mark else ''} | "
                 f"{run.seed} | {100 * record['accuracy']:.2f} | {record['loss']:.4f} | "
                 f"{record['step']} | {record['wall_seconds']:.0f} s |")
  return lines


def _plot_name():
  return "results_text_pretrained.png" if FLAGS.preset else "results_text.png"


def selection_runs():
  """The runs that choose each `--select` method's ε."""
  planned = []
  for spec in FLAGS.select:
    method, tasks, epsilons = parse_epsilons(spec, "select")
    planned += [NlpRun(task, method, seed, eps) for eps in epsilons
                for task in (tasks or FLAGS.select_tasks) for seed in FLAGS.select_seeds]
  return planned


def planned_runs(chosen=None):
  """The table's runs; methods in `chosen` ({method: ε}) run at that ε."""
  chosen = chosen or {}
  planned = [NlpRun(task, method, seed, chosen.get(method), selected=method in chosen)
             for task in FLAGS.tasks for method in FLAGS.methods for seed in FLAGS.seeds]
  for spec in FLAGS.sweep:
    method, tasks, epsilons = parse_epsilons(spec, "sweep")
    for epsilon in epsilons:
      planned += [NlpRun(task, method, seed, epsilon)
                  for task in (tasks or FLAGS.sweep_tasks or FLAGS.tasks)
                  for seed in FLAGS.sweep_seeds]
  return planned


def run_all(planned):
  """Results of `planned` (in order), `--jobs` at a time, each job on its own core."""
  cores = sorted(os.sched_getaffinity(0))
  pinned = FLAGS.jobs > 1 and len(cores) >= FLAGS.jobs
  free_cores = queue.Queue()
  for core in cores[:FLAGS.jobs] if pinned else []:
    # One core per job: parallel runs do not fight over each other's threads.
    free_cores.put(core)

  def one(numbered):
    i, run = numbered
    core = free_cores.get() if pinned else None
    run.cpus = None if core is None else [core]
    try:
      record = run.result("dev")
    finally:
      if core is not None:
        free_cores.put(core)
    print(f"[{i}/{len(planned)}] {run.name}: dev accuracy {100 * record['accuracy']:.2f}% "
          f"({record['wall_seconds']:.0f} s)", flush=True)
    return record

  with concurrent.futures.ThreadPoolExecutor(max(FLAGS.jobs, 1)) as pool:
    return list(pool.map(one, enumerate(planned, 1)))


def main(argv):
  del argv
  start = time.time()
  for task in set(FLAGS.tasks) | set(FLAGS.select_tasks if FLAGS.select else []):
    if not os.path.isdir(os.path.join(FLAGS.data_dir, task)):
      raise app.UsageError(f"No {task}/ under --data_dir={FLAGS.data_dir}.")
  selecting = selection_runs()
  selection = list(zip(selecting, run_all(selecting)))
  by_method = {}
  for run, record in selection:
    by_method.setdefault(run.method, {}).setdefault(run.epsilon, []).append(
        record["accuracy"])
  chosen = {method: runs.choose_best(accuracies) for method, accuracies in by_method.items()}
  for method, epsilon in chosen.items():
    tasks = sorted({run.task for run, _ in selection if run.method == method})
    print(f"{method}: ε = {epsilon:g} chosen on dev ({', '.join(tasks)}, "
          f"seeds {', '.join(FLAGS.select_seeds)}).", flush=True)
  planned = planned_runs(chosen)
  groups, finished = {}, []
  for run, record in zip(planned, run_all(planned)):
    finished.append((run, record))
    groups.setdefault((run.task, run.variant), []).append(record)
  total = sum(record["wall_seconds"] for _, record in finished + selection)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  write_markdown(groups, finished, selection, chosen, total, time.time() - start,
                 os.path.join(FLAGS.out_dir, "results.md"))
  plot(groups, os.path.join(FLAGS.out_dir, _plot_name()))
  print(f"Wrote {FLAGS.out_dir}/results.md and {_plot_name()} "
        f"({total / 60:.1f} min of runs).")


if __name__ == "__main__":
  app.run(main)
