"""The methods table: plain training, FGM and GP on FewCLUE TNEWS and IFLYTEK, over seeds.

    python -m tfadv.tools.methods_table --data_dir=../shared/data/fewclue \\
        --out_dir=docs --work_dir=runs/methods_table

Each run is `python -m tfadv.main --gin_file=configs/<task>_<method>.gin` in
its own process (one clean gin and TensorFlow state per run), trained on the
task's train split and evaluated on dev. A run whose model dir already holds
`eval_results.json` is read back, not repeated, so a killed table resumes
where it stopped. The tool writes the table's page, `<out_dir>/<section>.md`
(mean ± std per method and task, every run with its wall time, the command;
text outside its `<!-- section -->` markers is kept), and its plot. A table
is a spec file of flags, `configs/tables/*.flags` (`--flagfile=`).

`--sweep=fgm:0.1,0.3,3` adds rows for other ε values of a method (on
`--sweep_seeds`; `--sweep=gp@iflytek:0.1` on named tasks only), for when the
configs' ε does not help at this scale.

`--select=fgm_output:0.3,1,3` chooses a method's ε per task on the
validation split carved from train (`ClueDataset.validation_fraction`,
configs/base/clue.gin): each ε runs with every `--seeds` seed, each run keeps
its best checkpoint on validation, and the ε with the best mean validation
accuracy (the smaller on a tie) is that task's row; dev is only reported,
never used to choose. The section lists every candidate's validation and dev
numbers.

`--variant=fgm_random=fgm:EmbeddingFGM.direction='random'` adds a method
`fgm_random` run from `fgm`'s config with extra bindings (`;` between
several); `--same_epsilon=fgm_random:fgm` runs it at the ε chosen for `fgm`
on each task, once `fgm`'s candidates have all finished (the controls
table's random-direction rows: the adversarial method's ε, same norm). A
variant can also be `--select`ed like any method.

`--tie=tnews:3.6` makes ε candidates within 3.6 points of the best mean
validation accuracy a tie on TNEWS, won by the smallest ε (the controls
table's pre-registered rule: the binomial standard error of one validation
accuracy at the split's size). `--compare=fgm:fgm_random` adds, per task,
whether `fgm` beats `fgm_random` by more than the seeds' spread (the sum of
the two standard deviations), as every method is against plain.

`--attack_budgets=1,2` adds the attack pass: each chosen run is evaluated
again on all of dev under the character-substitution attack
(`tfadv.attacks.CharSubstitutionAttack`, budget B) with TextAttack's
metrics, in its own section (`<section>-attacks`), with `--attack_examples`
attacked examples of each run, evenly spaced over dev, written beside it.
`--attack_only` runs that pass alone, over the runs finished so far, beside an
invocation still training.

Each finished run's record (and each attack evaluation's) is also kept, with
the bindings it ran with, in `--records` (default
`<out_dir>/<section>_runs.json`, committed with the docs): model dirs live
on one machine's disk, and a table split across sessions or machines resumes
from the repository alone. With `--attack_budgets`, each run of an attacked
method is evaluated under the attacks as soon as it has trained, while its
model dir is here; a chosen run whose attack record is missing and whose
model dir is gone is trained again first (the rerun's record replaces the
kept one; a rerun that differs is reported).

`--report` starts no run: it writes the section from the runs already
finished (a method's ε is chosen once all its candidates have run) and lists
the runs still to come, for a table split across sessions.

`--preset=runs/pretrain_mlm_zh/preset` fine-tunes every run from a keras-hub
preset (e.g. the one `configs/pretrain_mlm_zh.gin` writes) and writes its
own section and plot (`results_text_pretrained.png`); `--jobs=2` runs two
runs at a time, each pinned to its own CPU core when there are enough.
"""

import os
import re
import time
from typing import Optional

from absl import app, flags

from tfadv.tools import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/data/fewclue", "FewCLUE directory "
                    "holding tnews/ and iflytek/.")
flags.DEFINE_string("out_dir", "docs/results", "Where the table's page and plot go.")
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
                          "ε per task by validation accuracy (mean over --seeds).")
flags.DEFINE_multi_string("variant", [], "NAME=METHOD:binding[;binding...]: a method "
                          "NAME run from METHOD's config with extra bindings.")
flags.DEFINE_multi_string("same_epsilon", [], "NAME:METHOD: NAME runs at the ε chosen "
                          "for METHOD on each task (after METHOD's candidates finish).")
flags.DEFINE_multi_string("gin_param", [], "Extra bindings for every run.")
flags.DEFINE_multi_string("task_gin_param", [], "task:binding, a binding for one "
                          "task's runs only, e.g. 'iflytek:Experiment.train_steps = 400'.")
flags.DEFINE_string("preset", None, "keras-hub preset (name or directory) that "
                    "every run fine-tunes from.")
flags.DEFINE_integer("jobs", 1, "Runs at a time.")
flags.DEFINE_bool("report", False, "Start no run: write the section from the runs "
                  "already finished and list the ones still to run.")
flags.DEFINE_string("section", None, "The table's section, its page's name "
                    "(<out_dir>/<section>.md) and its plot's; default by --preset.")
flags.DEFINE_string("title", None, "The section's title.")
flags.DEFINE_multi_string("tie", [], "task:points: on that task, ε candidates whose mean "
                          "validation accuracies are within POINTS of the best tie with "
                          "it, and the smallest tied ε is chosen (e.g. the standard "
                          "error of one validation accuracy at the split's size).")
flags.DEFINE_multi_string("compare", [], "METHOD:OTHER: the section says, per task, whether "
                          "METHOD beats OTHER by more than the seeds' spread (e.g. "
                          "fgm:fgm_random, an adversarial method against its random "
                          "control); every method is also compared with plain.")
flags.DEFINE_list("attack_budgets", [], "The attack pass: each chosen run of "
                  "--attack_methods is evaluated again on dev (`--mode=evaluate`, its "
                  "best checkpoint) under the character-substitution attack with each "
                  "budget B (CharSubstitutionAttack, names sub<B>), into "
                  "eval_results_dev_attacks.json; its own section, <section>-attacks. "
                  "Empty: no attack pass.")
flags.DEFINE_list("attack_methods", None, "Methods the attack pass evaluates (default: "
                  "every method of the table).")
flags.DEFINE_list("attack_searches", ["greedy"], "The attack pass's searches: 'greedy' "
                  "(sub<B>) and/or 'beam', the tight search under the same threat model "
                  "(sub<B>_beam; `CharSubstitutionAttack.search`), reported beside the "
                  "greedy one with the share of the examples greedy left standing that it "
                  "breaks.")
flags.DEFINE_bool("attack_smoothing", False, "The attack pass also evaluates "
                  "`SubstitutionSmoothing` (name 'smooth'): the smoothed classifier's "
                  "accuracy and its certified accuracy at radius 1 and 2.")
flags.DEFINE_multi_string("attack_gin_param", [], "A binding of the attack pass's "
                          "evaluations only ('TASK:binding' for one task's), e.g. "
                          "'ClueDataset.num_eval = 200' (the first 200 dev records).")
flags.DEFINE_integer("attack_examples", 20, "Dev examples each attack evaluation writes "
                     "under each budget (attack_examples_dev_attacks_sub<B>.jsonl).")
flags.DEFINE_string("records", None, "Finished runs' records (JSON, committed with the "
                    "docs), read before running and updated after; default "
                    "<out_dir>/<section>_runs.json; '' keeps none.")
flags.DEFINE_string("transcribe_from", None, "A commit whose page (or docs/results.md) lists "
                    "this table's runs (its section's per-run lists): keeps each listed "
                    "run's numbers in --records, marked transcribed, for runs whose model "
                    "dirs were lost; starts nothing.")
flags.DEFINE_integer("cv_folds", 5, "K of the k-fold cross-validation over train that "
                     "chooses --select's ε on a task whose validation split holds fewer "
                     "than --cv_below records.")
flags.DEFINE_integer("cv_below", 500, "Cross-validate on tasks whose validation split (the "
                     "config's validation_fraction of train) holds fewer records; 0: never.")
flags.DEFINE_list("cv_seeds", ["0"], "Seeds of the cross-validation runs (every fold x ε "
                  "candidate); the folds are fixed by the dataset's validation_seed.")
flags.DEFINE_bool("attack_only", False, "Start no training run (another invocation "
                  "trains them): only the attack pass, over the runs finished so far.")

TASK_TITLES = {"tnews": "TNEWS", "iflytek": "IFLYTEK"}


class NlpRun(runs.Run):
  """One (task, method, ε, seed) run of configs/<task>_<method>.gin."""

  def __init__(self, task, method, seed, epsilon=None, selected=False, fold=None):
    self.task, self.method, self.seed, self.epsilon = task, method, int(seed), epsilon
    self.selected = selected  # ε chosen on validation: the method's own row
    self.fold = fold  # a cross-validation run: validates on this fold of train
    eps = "" if epsilon is None else f"_eps{epsilon:g}"
    if fold is not None:
      eps += f"_fold{fold}"
    base, extra = variants().get(method, (method, []))
    params = [f"Experiment.seed = {self.seed}",
              f"ClueDataset.data_dir = '{os.path.join(FLAGS.data_dir, task)}'", *extra]
    if epsilon is not None:
      params.append(f"{runs.EPSILON_BINDING[base]} = {epsilon}")
      if base in runs.STEP_BINDING:
        binding, ratio = runs.STEP_BINDING[base]
        params.append(f"{binding} = {ratio * epsilon:g}")
    if FLAGS.preset:
      params.append(f"TextClassificationTask.preset = '{FLAGS.preset}'")
    if fold is not None:
      params += [f"{dataset}.{key} = {value}" for dataset in ("ClueDataset", "TextFileDataset")
                 for key, value in (("num_folds", FLAGS.cv_folds), ("validation_fold", fold))]
    super().__init__(f"{task}_{method}{eps}_seed{self.seed}",
                     os.path.join(FLAGS.config_dir, f"{task}_{base}.gin"),
                     params + FLAGS.gin_param + task_bindings(task), FLAGS.work_dir)

  @property
  def variant(self) -> str:
    if self.epsilon is None or self.selected:
      return self.method
    return f"{self.method} ε={self.epsilon:g}"


def variants():
  """{NAME: (METHOD, [binding, ...])} of the --variant flags."""
  found = {}
  for spec in FLAGS.variant:
    name, sep, rest = spec.partition("=")
    base, sep2, bindings = rest.partition(":")
    if not (sep and sep2 and name.strip() and bindings.strip()):
      raise app.UsageError(f"--variant={spec!r}: expected NAME=METHOD:binding[;binding...].")
    if base.strip() not in runs.EPSILON_BINDING and base.strip() != "plain":
      raise app.UsageError(f"--variant={spec!r}: {base!r} is not one of "
                           f"{sorted(runs.EPSILON_BINDING)} or plain.")
    found[name.strip()] = (base.strip(), [b.strip() for b in bindings.split(";") if b.strip()])
  return found


def same_epsilons():
  """{NAME: METHOD} of the --same_epsilon flags."""
  found = {}
  for spec in FLAGS.same_epsilon:
    name, sep, method = spec.partition(":")
    if not sep or name.strip() not in variants():
      raise app.UsageError(f"--same_epsilon={spec!r}: expected NAME:METHOD, NAME a --variant.")
    found[name.strip()] = method.strip()
  return found


def _bindings_of(task: str, specs, flag: str, unscoped: bool):
  """The bindings of `specs` ('TASK:binding') that apply to `task`; with
  `unscoped`, a spec with no 'TASK:' applies to every task."""
  bindings = []
  for spec in specs:
    name, sep, binding = spec.partition(":")
    if unscoped and not (sep and "=" not in name and "." not in name):
      bindings.append(spec.strip())
      continue
    if not sep or not binding.strip():
      raise app.UsageError(f"--{flag}={spec!r}: expected TASK:binding.")
    if name.strip() == task:
      bindings.append(binding.strip())
  return bindings


def task_bindings(task: str):
  """The --task_gin_param bindings of `task`."""
  return _bindings_of(task, FLAGS.task_gin_param, "task_gin_param", unscoped=False)


def ties():
  """{task: tie band in accuracy points} of the --tie flags."""
  found = {}
  for spec in FLAGS.tie:
    task, sep, points = spec.partition(":")
    try:
      band = float(points)
    except ValueError:
      band = -1.0
    if not sep or band < 0:
      raise app.UsageError(f"--tie={spec!r}: expected TASK:POINTS, e.g. tnews:3.6.")
    found[task.strip()] = band
  return found


def comparisons():
  """[(METHOD, OTHER)]: every method against plain, then the --compare pairs
  (a pair already listed is listed once)."""
  pairs = [(method, "plain") for method in FLAGS.methods if method != "plain"]
  for spec in FLAGS.compare:
    method, sep, other = spec.partition(":")
    if not sep or method.strip() not in FLAGS.methods or other.strip() not in FLAGS.methods:
      raise app.UsageError(f"--compare={spec!r}: expected METHOD:OTHER, both in --methods.")
    pair = (method.strip(), other.strip())
    if pair not in pairs:
      pairs.append(pair)
  return pairs


def parse_epsilons(spec: str, flag: str):
  return runs.parse_method_values(spec, flag, sorted(runs.EPSILON_BINDING) + sorted(variants()))


def plot(groups, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(dict.fromkeys(task for task, _ in groups))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  every_variant = list(dict.fromkeys(v for _, v in groups))  # one colour a method
  for ax, task in zip(axes[0], tasks):
    variants = [v for t, v in groups if t == task]
    for i, variant in enumerate(variants):
      accs = [100 * r["accuracy"] for r in groups[(task, variant)]]
      mean, std = runs.mean_std(accs)
      ax.bar(i, mean, yerr=std, capsize=4, alpha=0.7,
             color=f"C{every_variant.index(variant) % 10}")
      ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_title(f"FewCLUE {TASK_TITLES.get(task, task)} dev")
    ax.set_ylabel("accuracy (%)")
    lows = [100 * r["accuracy"] for v in variants for r in groups[(task, v)]]
    ax.set_ylim(max(0, min(lows) - 5), max(lows) + 3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_markdown(groups, finished, selection, chosen, total_seconds, path, missing=(), scores=None, cv_runs=()):
  tasks = list(dict.fromkeys(task for task, _ in groups))
  variants = list(dict.fromkeys(v for _, v in groups))
  title = "## Text: FewCLUE TNEWS and IFLYTEK (plain, FGM, GP)"
  if FLAGS.preset:
    title = ("## Text: FewCLUE TNEWS and IFLYTEK, fine-tuned from the locally "
             f"pretrained preset (`{FLAGS.preset}`)")
  title = f"## {FLAGS.title}" if FLAGS.title else title
  lines = [title, "",
           "Produced by (from the repository root, FewCLUE beside it as WORKSPACE.md describes):", "",
           "```", runs.command_line("tfadv.tools.methods_table").replace(" --report", ""),
           "```", "",
           f"Whole table: {total_seconds / 60:.1f} min of wall time summed over "
           f"{len(finished) + len(cv_runs)} runs (each run's own in its row).", ""]
  if groups:
    lines += ["Dev accuracy (%), mean ± sample std over seeds (n = number of seeds); "
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
    band = ties()
    tie_note = ("; means within " + ", ".join(f"{p:g} points on {TASK_TITLES.get(t, t)}"
                                             for t, p in band.items())
                + " of the best tie with it, and the smallest tied ε wins") if band else ""
    cv_tasks = sorted({task for task, _ in chosen if cross_validates(task)})
    cv_note = (f"; on {', '.join(TASK_TITLES.get(t, t) for t in cv_tasks)} (validation split "
               f"under {FLAGS.cv_below} records) by {FLAGS.cv_folds}-fold cross-validation "
               f"over train instead: the mean over folds x seeds {', '.join(FLAGS.cv_seeds)} "
               "of each fold's best validation accuracy, folds fixed by the dataset's "
               "validation_seed") if cv_tasks else ""
    lines += ["", "ε chosen per task on the validation split (mean validation accuracy "
              "of the best checkpoints over the seeds; dev never used to choose"
              f"{tie_note}{cv_note}):", "",
              runs.CHOSEN_HEADER,
              "|---|---|---|---|"]
    for (task, method), epsilon in sorted(chosen.items()):
      by_eps = (scores or {}).get((task, method), {})
      cells = ", ".join(f"{e:g}: {100 * runs.mean_std(v)[0]:.2f}"
                        for e, v in sorted(by_eps.items()))
      lines.append(f"| {task} | {method} | {epsilon:g} | {cells} |")
    stability = fold_choices(cv_runs)
    if stability:
      lines += ["", "How often each fold (and seed) alone would choose the same ε:", "",
                "| task | method | chosen ε | each fold's choice | agree |", "|---|---|---|---|---|"]
      for (task, method), picks in sorted(stability.items()):
        if (task, method) in chosen:
          agree = sum(p == chosen[(task, method)] for p in picks)
          lines.append(f"| {task} | {method} | {chosen[(task, method)]:g} | "
                       f"{', '.join(f'{p:g}' for p in picks)} | {agree} of {len(picks)} |")
  lines += _comparison_lines(groups, tasks, "accuracy", "dev accuracy")
  lines += _cost_lines(groups, tasks, variants)
  if groups:  # the plot is drawn once a run has finished
    lines += ["", f"![methods table]({_plot_name()})", ""]
  if selection:
    lines += ["Every ε candidate (the chosen ones are marked):", ""]
    lines += _run_rows([(run, record, run.epsilon == chosen.get((run.task, run.method)))
                        for run, record in selection], variant=lambda run: (
                            f"{run.method} ε={run.epsilon:g}"))
    lines.append("")
  others = [(run, record, False) for run, record in finished if not run.selected]
  if others:
    lines += ["Every other run of the table:" if selection else "Every run of the table:", ""]
    lines += _run_rows(others, variant=lambda run: run.variant)
  if any(TRANSCRIBED in record for _, record in finished):
    lines += ["", TRANSCRIBED_NOTE]
  if missing:
    counts = {}
    for run in missing:
      counts[(run.task, run.method)] = counts.get((run.task, run.method), 0) + 1
    lines += ["", f"Not run yet ({len(missing)} runs; the same command without "
              "`--report` runs them, resuming any that stopped): " + ", ".join(
                  f"{TASK_TITLES.get(task, task)} {method} ({n})"
                  for (task, method), n in counts.items()) + "."]
  runs.replace_section(path, section_name(), "\n".join(lines))


def _cost_lines(groups, tasks, variants):
  """Each row's training time (the training loop alone, mean over its seeds)
  and its ratio to plain's on the task. Runs shared the machine two at a
  time, so a ratio carries the load's noise: benchmarks/ measure step time."""
  rows = []
  for variant in variants:
    cells = []
    for task in tasks:
      mine = [r["train_seconds"] for r in groups.get((task, variant), []) if "train_seconds" in r]
      plain = [r["train_seconds"] for r in groups.get((task, "plain"), []) if "train_seconds" in r]
      if not mine:
        cells.append("–")
        continue
      cell = f"{runs.mean_std(mine)[0]:.0f} s"
      if plain:
        cell += f" ({runs.mean_std(mine)[0] / runs.mean_std(plain)[0]:.2f}×)"
      cells.append(cell)
    if any(c != "–" for c in cells):
      rows.append(f"| {variant} | " + " | ".join(cells) + " |")
  if not rows:
    return []
  return ["", "Training time (the training loop alone, mean over seeds; in brackets the "
          "ratio to plain's; runs shared the machine, so ratios carry its load: "
          "`benchmarks/` measures step time):", "",
          "| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |",
          "|---" * (len(tasks) + 1) + "|", *rows]


def _comparison_lines(groups, tasks, key, what):
  """Per task, each comparison of `comparisons()` on `key` (a record's
  metric) over the seeds: the difference of means against the spread."""
  rows = []
  for task in tasks:
    for method, other in comparisons():
      mine, theirs = groups.get((task, method)), groups.get((task, other))
      if not (mine and theirs):
        continue
      diff, spread, verdict = runs.versus([100 * r[key] for r in mine],
                                          [100 * r[key] for r in theirs])
      rows.append(f"| {TASK_TITLES.get(task, task)} | {method} | {other} | {diff:+.2f} | "
                  f"{spread:.2f} | {verdict} |")
  if not rows:
    return []
  return ["", f"Does each method beat the other by more than the seeds' spread ({what}, "
          "points; spread = the sum of the two sample standard deviations, so "
          "\"better\" means the mean ± std intervals do not overlap)?", "",
          "| task | method | against | difference of means | spread | verdict |",
          "|---|---|---|---|---|---|", *rows]


ATTACK_TAG = "attacks"
SMOOTH = "smooth"  # the smoothing evaluation's name (accuracy_smooth, smooth_certified<d>)
ATTACK_ROWS = "Every attack evaluation (under attack / characters changed / queries):"


SEARCHES = ("greedy", "beam")


def attack_names():
  """{attack name: (budget, search)}: `sub<B>` the greedy search, `sub<B>_beam`
  the tight one, for each --attack_budgets budget and --attack_searches search."""
  for search in FLAGS.attack_searches:
    if search not in SEARCHES:
      raise app.UsageError(f"--attack_searches: {search!r} is not one of {SEARCHES}.")
  return {f"sub{int(b)}" + ("" if search == "greedy" else f"_{search}"): (int(b), search)
          for b in FLAGS.attack_budgets for search in FLAGS.attack_searches}


def attack_bindings(task: str):
  """The --attack_gin_param bindings of `task`'s evaluations."""
  return _bindings_of(task, FLAGS.attack_gin_param, "attack_gin_param", unscoped=True)


def attack_split(task: str) -> str:
  """The split name the attack pass's evaluations record: "dev", or
  "dev_first<N>" under an --attack_gin_param `num_eval` binding."""
  for binding in attack_bindings(task):
    found = re.fullmatch(r"\S*\.num_eval = (\d+)", binding)
    if found:
      return f"dev_first{int(found.group(1))}"
  return "dev"


def attack_run(run: NlpRun) -> runs.Run:
  """`run`'s best checkpoint evaluated on dev under the character attack
  (`attack_names`), and under smoothing with --attack_smoothing."""
  names = attack_names()
  entries = [f"'{name}': @{name}/CharSubstitutionAttack()" for name in names]
  if FLAGS.attack_smoothing:
    entries.append(f"'{SMOOTH}': @{SMOOTH}/SubstitutionSmoothing()")
  params = [f"Experiment.eval_attacks = {{{', '.join(entries)}}}",
            *(f"{name}/CharSubstitutionAttack.budget = {b}" for name, (b, _) in names.items()),
            *(f"{name}/CharSubstitutionAttack.search = '{search}'"
              for name, (_, search) in names.items() if search != "greedy"),
            f"Experiment.attack_examples = {FLAGS.attack_examples}",
            *attack_bindings(run.task)]
  return runs.Run(run.name, run.gin_file, run.params + params, FLAGS.work_dir,
                  mode="evaluate", tag=ATTACK_TAG)


def write_attack_markdown(evaluated, missing, path):
  """The attack pass's section: TextAttack's metrics per task and method
  (`evaluated`: [(the trained `NlpRun`, its attack record)])."""
  budgets = [int(b) for b in FLAGS.attack_budgets]
  groups = {}
  for run, record in evaluated:
    groups.setdefault((run.task, run.method), []).append(record)
  tasks = list(dict.fromkeys(task for task, _ in groups))
  title = FLAGS.title or "Text methods"
  splits = {attack_split(task) for task in (tasks or FLAGS.tasks)}
  where = ("every dev record" if splits == {"dev"} else "the first " + " / ".join(
      sorted(s[len("dev_first"):] for s in splits)) + " dev records (`num_eval`; `clean` "
      "is their accuracy)")
  rules = {budget_rule(task) for task in (tasks or FLAGS.tasks)} - {None}
  share = ("max(ceil(10% of the sentence's characters), 1) (TextAttack's rule)"
           if rules == {"ceil"} else "10% of the sentence's" if rules <= {"floor"}
           else "each task's rule of 10% of the sentence's")
  lines = [f"## {title}: under the character-substitution attack", "",
           "Produced by (the table's command with the attack pass):", "", "```",
           runs.command_line("tfadv.tools.methods_table").replace(" --report", ""), "```", "",
           "Each chosen run's best checkpoint (the one its dev accuracy is reported "
           f"for) is evaluated again on {where} (`--mode=evaluate`, "
           f"`Experiment.eval_tag = '{ATTACK_TAG}'`). The attack "
           "(`CharSubstitutionAttack`) replaces at most B characters, and at most "
           f"{share}, by same-pinyin characters or the model's nearest "
           "characters in its token-embedding table, greedily, guided by the "
           "embedding gradient and verified by forward passes. Metrics as TextAttack "
           "defines them: under attack = failed / all examples; success rate = "
           "successful / (successful + failed), examples wrong before the attack "
           "(skipped) left out; characters changed per successful attack; queries = "
           "forward passes per attacked example. Mean ± sample std over seeds (n).", ""]
  tight = [s for s in FLAGS.attack_searches if s != "greedy"]
  if tight:
    lines += ["`beam B=b`: accuracy under the tight search of the same threat model "
              "(`CharSubstitutionAttack.search = 'beam'`: every single substitution, "
              "then a beam of the best with every further one, on the examples the "
              "greedy search left standing; an example counts as broken when either "
              "search breaks it); `beam breaks B=b`: the "
              "share of the examples the greedy search left standing that it breaks, "
              "1 − beam / under, per seed.", ""]
  if FLAGS.attack_smoothing:
    lines += ["`smoothed`: the accuracy of `SubstitutionSmoothing`'s majority vote over "
              "randomly substituted copies; `certified d`: the share of examples it "
              "classifies correctly with a certified radius of at least d characters "
              "(Clopper–Pearson bound at its confidence level).", ""]
  head = ["method", "clean"]
  for b in budgets:
    head += [f"under B={b}", f"success B={b}", f"chars B={b}", f"queries B={b}"]
  for b in budgets:
    for s in tight:
      head += [f"{s} B={b}", f"{s} breaks B={b}", f"{s} queries B={b}"]
  if FLAGS.attack_smoothing:
    head += ["smoothed", "certified 1", "certified 2"]
  for task in tasks:
    lines += [f"**{TASK_TITLES.get(task, task)}** (dev, %):", "",
              "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (t, method), records in groups.items():
      if t != task:
        continue
      cells = [_mean_std_cell(records, "accuracy", 100)]
      for b in budgets:
        cells += [_mean_std_cell(records, f"accuracy_sub{b}", 100),
                  _mean_std_cell(records, f"success_rate_sub{b}", 100),
                  _mean_std_cell(records, f"sub{b}_changed", 1),
                  _mean_std_cell(records, f"sub{b}_queries", 1)]
      for b in budgets:
        for s in tight:
          cells += [_mean_std_cell(records, f"accuracy_sub{b}_{s}", 100),
                    _mean_std_cell([{"v": _breaks(r, b, s)} for r in records
                                    if _breaks(r, b, s) is not None], "v", 100),
                    _mean_std_cell(records, f"sub{b}_{s}_queries", 1)]
      if FLAGS.attack_smoothing:
        cells += [_mean_std_cell(records, f"accuracy_{SMOOTH}", 100),
                  _mean_std_cell(records, f"{SMOOTH}_certified1", 100),
                  _mean_std_cell(records, f"{SMOOTH}_certified2", 100)]
      lines.append(f"| {method} (n={len(records)}) | " + " | ".join(cells) + " |")
    lines.append("")
  for b in budgets:
    lines += _comparison_lines(groups, tasks, f"accuracy_sub{b}",
                               f"dev accuracy under the {b}-character attack")
    for s in tight:
      lines += _comparison_lines(groups, tasks, f"accuracy_sub{b}_{s}",
                                 f"dev accuracy under the {b}-character {s} search")
  if FLAGS.attack_smoothing:
    lines += _comparison_lines(groups, tasks, f"{SMOOTH}_certified1",
                               "certified accuracy at radius 1")
  extra = [f"{s} B={b} (under / queries)" for b in budgets for s in tight]
  extra += ["smoothed / certified 1 / 2"] if FLAGS.attack_smoothing else []
  lines += ["", ATTACK_ROWS, "",
            "| task | method | seed | clean | " + " | ".join(
                [f"B={b}" for b in budgets] + extra) + " | wall time |",
            "|---|---|---|---|" + "---|" * (len(budgets) + len(extra)) + "---|"]
  for run, record in evaluated:
    cells = [f"{100 * record[f'accuracy_sub{b}']:.2f} / "
             f"{_number(record, f'sub{b}_changed')} / "
             f"{_number(record, f'sub{b}_queries')}" for b in budgets]
    cells += [f"{_percent(record, f'accuracy_sub{b}_{s}')} / "
              f"{_number(record, f'sub{b}_{s}_queries')}" for b in budgets for s in tight]
    if FLAGS.attack_smoothing:
      cells.append(" / ".join(_percent(record, key) for key in (
          f"accuracy_{SMOOTH}", f"{SMOOTH}_certified1", f"{SMOOTH}_certified2")))
    lines.append(f"| {run.task} | {run.method} | {run.seed}{_mark(record)} | "
                 f"{100 * record['accuracy']:.2f} | " + " | ".join(cells)
                 + f" | {record['wall_seconds']:.0f} s |")
  if any(TRANSCRIBED in record for _, record in evaluated):
    lines += ["", TRANSCRIBED_NOTE]
  if missing:
    lines += ["", f"Not evaluated yet ({len(missing)} runs; the same command without "
              "`--report` evaluates them, once their runs have finished)."]
  section = section_name() + "-attacks"
  runs.replace_section(path, section, "\n".join(lines))


def _breaks(record, budget, search):
  """The share of the examples the greedy search left standing that `search`
  breaks: 1 − (accuracy under it) / (accuracy under greedy); None if greedy
  left none."""
  greedy, tight = record.get(f"accuracy_sub{budget}"), record.get(
      f"accuracy_sub{budget}_{search}")
  if greedy is None or tight is None or greedy <= 0:
    return None
  return 1 - tight / greedy


def _percent(record, key) -> str:
  return f"{100 * record[key]:.2f}" if key in record else "–"


def _mean_std_cell(records, key, scale):
  values = [scale * r[key] for r in records if key in r]
  if not values:
    return "–"
  mean, std = runs.mean_std(values)
  return f"{mean:.2f} ± {std:.2f}" + (f" (n={len(values)})" if len(values) < len(records) else "")


# A kept record copied from a section's per-run list after its model dir was
# lost (`runs.RecordStore`): its numbers as printed there.
TRANSCRIBED = "transcribed"
TRANSCRIBED_NOTE = ("† Transcribed from this section's per-run list (the value of "
                    "`transcribed` in the records names the commit) after the run's model "
                    "dir was lost with its machine: the numbers as printed there, "
                    "rounded so; a run trained again replaces its record.")


def _mark(record) -> str:
  return " †" if TRANSCRIBED in record else ""


def _number(record, key) -> str:
  return f"{record[key]:.2f}" if key in record else "–"


def _run_rows(rows, variant):
  lines = ["| task | method | seed | validation accuracy | dev accuracy | dev loss | "
           "best checkpoint (step) | wall time |",
           "|---|---|---|---|---|---|---|---|"]
  for run, record, mark in rows:
    best = record.get("best")
    validation = f"{100 * best['metrics']['accuracy']:.2f}" if best else "–"
    lines.append(f"| {run.task} | {variant(run)}{' (chosen)' if mark else ''} | "
                 f"{run.seed}{_mark(record)} | {validation} | {100 * record['accuracy']:.2f} | "
                 f"{record['loss']:.4f} | {record['step']} | {record['wall_seconds']:.0f} s |")
  return lines


def _plot_name():
  if FLAGS.section:
    return f"results_{FLAGS.section.replace('-', '_')}.png"
  return "results_text_pretrained.png" if FLAGS.preset else "results_text.png"


def planned_runs():
  """The table's runs: every method x task x seed, each `--select` ε of a method."""
  selected = {}
  for spec in FLAGS.select:
    method, tasks, epsilons = parse_epsilons(spec, "select")
    for task in tasks or FLAGS.tasks:
      selected[(task, method)] = epsilons
  planned = []
  for task in FLAGS.tasks:
    for method in FLAGS.methods:
      if method in same_epsilons():
        continue  # planned once its method's ε is chosen (`dependent_runs`)
      for epsilon in selected.get((task, method), [None]):
        planned += [NlpRun(task, method, seed, epsilon, selected=epsilon is not None)
                    for seed in FLAGS.seeds]
        if epsilon is not None and cross_validates(task):
          planned += [NlpRun(task, method, seed, epsilon, selected=True, fold=fold)
                      for fold in range(FLAGS.cv_folds) for seed in FLAGS.cv_seeds]
  for spec in FLAGS.sweep:
    method, tasks, epsilons = parse_epsilons(spec, "sweep")
    for epsilon in epsilons:
      planned += [NlpRun(task, method, seed, epsilon)
                  for task in (tasks or FLAGS.sweep_tasks or FLAGS.tasks)
                  for seed in FLAGS.sweep_seeds]
  return planned


def dependent_runs(chosen):
  """(runs, pending) of the --same_epsilon methods: the runs at their
  method's chosen ε, and placeholders for tasks whose ε is not chosen yet.
  Each is its own one-candidate selection, so it gets a row like any method."""
  ready, pending = [], []
  for task in FLAGS.tasks:
    for name, method in same_epsilons().items():
      if name not in FLAGS.methods:
        continue
      epsilon = chosen.get((task, method))
      for seed in FLAGS.seeds:
        if epsilon is None:
          pending.append(NlpRun(task, name, seed))
        else:
          ready.append(NlpRun(task, name, seed, epsilon, selected=True))
  return ready, pending


_VALIDATION_SIZES = {}
_BUDGET_RULES = {}


def plain_config_values(task: str, names, bindings=()) -> dict:
  """{name: its value, or None where unbound} in `task`'s plain config with
  `bindings` added (gin's global config is cleared before and after)."""
  import gin  # pylint: disable=g-import-not-at-top
  from tfadv.config import parse_config  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  parse_config([os.path.join(FLAGS.config_dir, f"{task}_plain.gin")], list(bindings))
  values = {}
  for name in names:
    try:
      values[name] = gin.query_parameter(name)
    except ValueError:
      values[name] = None
  gin.clear_config()
  return values


def budget_rule(task: str) -> Optional[str]:
  """The character attack's budget rule on `task`'s runs: its plain config's
  binding (configs/base/clue.gin: 'floor'; text_file.gin: 'ceil'), unless
  --gin_param binds another."""
  config = os.path.join(FLAGS.config_dir, f"{task}_plain.gin")
  if not os.path.exists(config):
    return None  # a table of runs whose configs are not here (transcribed): not known
  if task not in _BUDGET_RULES:
    name = "CharSubstitutionAttack.budget_rule"
    # Unbound: the attack's default, 'ceil'.
    _BUDGET_RULES[task] = plain_config_values(task, [name], FLAGS.gin_param)[name] or "ceil"
  return _BUDGET_RULES[task]


def validation_size(task: str) -> int:
  """Records in `task`'s validation split: its config's validation_fraction
  of the lines of its train file."""
  if task not in _VALIDATION_SIZES:
    fractions = [f"{dataset}.validation_fraction"
                 for dataset in ("ClueDataset", "TextFileDataset")]
    values = plain_config_values(task, fractions + ["TextFileDataset.train_file"])
    fraction = max([0.0] + [values[name] for name in fractions if values[name] is not None])
    train_file = values["TextFileDataset.train_file"] or "train.json"
    path = os.path.join(FLAGS.data_dir, task, train_file)
    if not os.path.exists(path):
      raise app.UsageError(f"--cv_below={FLAGS.cv_below}: cannot size {task}'s validation "
                           f"split without {path}; pass --cv_below=0 to choose on it as is.")
    with open(path, "rb") as f:
      lines = sum(1 for line in f if line.strip())
    _VALIDATION_SIZES[task] = int(round(lines * fraction))
  return _VALIDATION_SIZES[task]


def cross_validates(task: str) -> bool:
  """Whether --select chooses on `task` by k-fold cross-validation."""
  return bool(FLAGS.select) and FLAGS.cv_below > 0 and validation_size(task) < FLAGS.cv_below


def validation_accuracy(record) -> float:
  """The accuracy of the run's best checkpoint on its validation split."""
  if "best" not in record:
    raise app.UsageError("--select needs runs with a validation split "
                         "(ClueDataset.validation_fraction > 0, as in configs/base/clue.gin).")
  return record["best"]["metrics"]["accuracy"]


def selection_scores(finished, missing=()):
  """{(task, method): {ε: [validation accuracies]}} of the selected methods
  whose candidates have all run: the best checkpoints' validation accuracies
  over the seeds, or, on a task that cross-validates, over folds x seeds."""
  pending = {(run.task, run.method) for run in missing if run.selected}
  candidates = {}
  for run, record in finished:
    if not run.selected or (run.task, run.method) in pending:
      continue
    if (run.fold is not None) != cross_validates(run.task):
      continue  # on a cross-validated task only the fold runs choose
    candidates.setdefault((run.task, run.method), {}).setdefault(
        run.epsilon, []).append(validation_accuracy(record))
  return candidates


def choose(finished, missing=()):
  """{(task, method): ε} of the selected methods, by mean validation accuracy.

  A method is chosen for a task only once every ε candidate has run with
  every seed (and, cross-validating, every fold; `missing` holds the runs
  still to come); means within the task's `--tie` band of the best tie, and
  the smallest tied ε wins.
  """
  band = ties()
  return {key: runs.choose_best(by_eps, tie=band.get(key[0], 0.0) / 100)
          for key, by_eps in selection_scores(finished, missing).items()}


def fold_choices(cv_runs):
  """{(task, method): [ε chosen by each (fold, seed) alone]}: how stable the
  cross-validated choice is (each alone, ties as in `choose`)."""
  band, by_key = ties(), {}
  for run, record in cv_runs:
    by_key.setdefault((run.task, run.method), {}).setdefault((run.fold, run.seed), {})[
        run.epsilon] = [validation_accuracy(record)]
  return {key: [runs.choose_best(one, tie=band.get(key[0], 0.0) / 100)
                for _, one in sorted(groups.items())]
          for key, groups in by_key.items()}


# Where every table's section was, before one page per table (`transcribe`
# reads old commits).
LEGACY_PAGE = "docs/results.md"


def page() -> str:
  """This table's page, `<out_dir>/<section>.md`."""
  return runs.page_path(FLAGS.out_dir, section_name())


def section_name() -> str:
  return FLAGS.section or ("text-methods-table-pretrained" if FLAGS.preset
                           else "text-methods-table")


def record_store() -> runs.RecordStore:
  """The `--records` store (default `<out_dir>/<section>_runs.json`)."""
  path = FLAGS.records
  if path is None:
    path = os.path.join(FLAGS.out_dir, f"{section_name().replace('-', '_')}_runs.json")
  return runs.RecordStore(path)


def run_all(planned, start=True, describe=None, then=None):
  """Results of `planned` (in order), `--jobs` at a time, each job on its own
  core; with `start` False, only those already finished (None for the rest).

  A record kept in `record_store()` with the run's bindings is read back;
  a run finished in its model dir is kept there. `then(run, cpus)`, with
  `start`, follows each run on the same core (the attack evaluation)."""
  store = record_store()

  def one(numbered, cpus):
    i, run = numbered
    record = store.get(run.key, run.params)
    if record is None:
      record = run.finished("dev")
      if record is None and start:
        run.cpus = cpus
        record = run.result("dev")
        text = (describe(record) if describe
                else f"dev accuracy {100 * record['accuracy']:.2f}%")
        print(f"[{i}/{len(planned)}] {run.name}: {text} ({record['wall_seconds']:.0f} s)",
              flush=True)
      if record is not None:
        record = store.put(run.key, run.params, record)
    if start and then is not None and record is not None:
      then(run, cpus)
    return record

  return runs.run_pinned(one, list(enumerate(planned, 1)), FLAGS.jobs)


def attacked(run) -> bool:
  """Whether the attack pass evaluates `run`'s method."""
  return bool(FLAGS.attack_budgets) and run.method in (FLAGS.attack_methods or FLAGS.methods)


def attack_now(run, cpus):
  """Evaluates a just-trained run under the attacks while its model dir is
  on this machine (a run read back from the records alone is left to the
  attack pass, which trains it again if it is chosen)."""
  if not attacked(run) or run.finished("dev") is None:
    return
  store = record_store()
  evaluation = attack_run(run)
  if store.get(evaluation.key, evaluation.params) is None:
    evaluation.cpus = cpus
    store.put(evaluation.key, evaluation.params, evaluation.result(attack_split(run.task)))


def attack_pass(finished, chosen):
  """Evaluates (or reads back) each chosen run of --attack_methods under the
  attacks; writes the section. Runs whose training has not finished wait; a
  chosen run kept only in the records (its model dir gone) trains again first."""
  store = record_store()
  trained = [run for run, _ in finished if attacked(run) and (
      not run.selected or run.epsilon == chosen.get((run.task, run.method)))]
  budgets = [int(b) for b in FLAGS.attack_budgets]

  def one(numbered, cpus):
    i, run = numbered
    evaluation = attack_run(run)
    split = attack_split(run.task)
    kept_evaluation = store.get(evaluation.key, evaluation.params)
    record = kept_evaluation or evaluation.finished(split)
    if record is None and not FLAGS.report:
      if run.finished("dev") is None:  # its model dir is gone: train it again
        kept = store.get(run.key, run.params)
        run.cpus = cpus
        again = run.result("dev")
        store.put(run.key, run.params, again)
        if kept is not None and abs(kept["accuracy"] - again["accuracy"]) > 5e-5:
          print(f"{run.name}: trained again, dev accuracy {100 * again['accuracy']:.2f}% "
                f"(kept record: {100 * kept['accuracy']:.2f}%)", flush=True)
      evaluation.cpus = cpus
      record = evaluation.result(split)
      print(f"[{i}/{len(trained)}] {run.name} attacked: dev accuracy "
            f"{100 * record['accuracy']:.2f}%, " + ", ".join(
                f"under {b} character{'s' if b > 1 else ''} "
                f"{100 * record[f'accuracy_sub{b}']:.2f}%" for b in budgets)
            + f" ({record['wall_seconds']:.0f} s)", flush=True)
    if record is not None and kept_evaluation is None:  # a kept record is never rewritten
      record = store.put(evaluation.key, evaluation.params, record)
    return record

  records = runs.run_pinned(one, list(enumerate(trained, 1)), FLAGS.jobs)
  evaluated = [(run, r) for run, r in zip(trained, records) if r is not None]
  missing = [run for run, r in zip(trained, records) if r is None]
  path = page()
  write_attack_markdown(evaluated, missing, path)
  print(f"Wrote the attack section of {path} ({len(evaluated)} evaluations).", flush=True)


def _table_rows(text, header):
  """The cells of each row of the markdown table under `header` in `text`."""
  rows, lines = [], text.split(header, 1)[1].splitlines()[2:] if header in text else []
  for line in lines:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  return rows


def transcribe(revision):
  """Keeps the runs listed in `revision`'s section of this table in the
  records, marked transcribed: each training run's validation and dev
  numbers, step and wall time, and each attack evaluation's clean and
  attacked accuracies (success rates follow from them: successful /
  (successful + failed) = 1 − under attack / clean)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  for path in (page(), LEGACY_PAGE):  # before one page per table, one results.md
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True,
                           text=True)
    if shown.returncode == 0 and f"<!-- {section_name()} -->" in shown.stdout:
      break
  else:
    raise app.UsageError(f"{revision} has no section {section_name()!r} in {page()} or "
                         f"{LEGACY_PAGE}.")
  content = shown.stdout
  store, note = record_store(), f"{revision}:{path}"
  section = runs.read_section_text(content, section_name())
  chosen_runs, count = {}, 0
  for header in ("Every ε candidate (the chosen ones are marked):",
                 "Every other run of the table:", "Every run of the table:"):
    for task, variant, seed, validation, dev, loss, step, wall in _table_rows(
        section, header + "\n\n| task | method | seed |"):
      mark = variant.endswith(" (chosen)")
      method, _, epsilon = variant.replace(" (chosen)", "").partition(" ε=")
      run = NlpRun(task, method, seed.rstrip(" †"), float(epsilon) if epsilon else None,
                   selected=bool(epsilon))
      if mark or not epsilon:
        chosen_runs[(task, method, run.seed)] = run
      record = {"split": "dev", "accuracy": round(float(dev) / 100, 6), "loss": float(loss),
                "step": int(step), "wall_seconds": float(wall.rstrip(" s")),
                TRANSCRIBED: note}
      if validation != "–":
        record["best"] = {"metrics": {"accuracy": round(float(validation) / 100, 6)}}
      store.put(run.key, run.params, record)
      count += 1
  attacks = runs.read_section_text(content, section_name() + "-attacks")
  budgets = [int(b) for b in FLAGS.attack_budgets]
  evaluations = 0
  rows = []
  for header in (ATTACK_ROWS, "Every attack evaluation:"):  # since 2026-12-01, before
    rows += _table_rows(attacks, header + "\n\n| task | method | seed |")
  for cells in rows:
    task, method, seed, clean = cells[:4]
    run = chosen_runs[(task, method, int(seed.rstrip(" †")))]
    record = {"split": "dev", "accuracy": round(float(clean) / 100, 6),
              "wall_seconds": float(cells[-1].rstrip(" s")), TRANSCRIBED: note}
    for b, cell in zip(budgets, cells[4:-1]):
      under, *more = cell.split(" / ")
      record[f"accuracy_sub{b}"] = round(float(under) / 100, 6)
      if float(clean) > 0:
        record[f"success_rate_sub{b}"] = round(1 - float(under) / float(clean), 6)
      for key, value in zip((f"sub{b}_changed", f"sub{b}_queries"), more):
        if value != "–":
          record[key] = float(value)
    evaluation = attack_run(run)
    store.put(evaluation.key, evaluation.params, record)
    evaluations += 1
  print(f"Kept {count} runs and {evaluations} attack evaluations of {note} in "
        f"{store.path}.", flush=True)


def main(argv):
  del argv
  start = time.time()
  for task in FLAGS.tasks:
    if not os.path.isdir(os.path.join(FLAGS.data_dir, task)):
      raise app.UsageError(f"No {task}/ under --data_dir={FLAGS.data_dir}.")
  if FLAGS.transcribe_from:
    transcribe(FLAGS.transcribe_from)
    return
  planned = planned_runs()
  train = not (FLAGS.report or FLAGS.attack_only)
  then = attack_now if FLAGS.attack_budgets else None
  records = run_all(planned, start=train, then=then)
  finished = [(run, record) for run, record in zip(planned, records) if record is not None]
  missing = [run for run, record in zip(planned, records) if record is None]
  chosen = choose(finished, missing)
  scores = selection_scores(finished, missing)
  # Cross-validation runs choose; they are not rows of the table.
  cv_runs = [(run, record) for run, record in finished if run.fold is not None]
  finished = [(run, record) for run, record in finished if run.fold is None]
  if FLAGS.same_epsilon:  # the runs at another method's chosen ε
    ready, pending = dependent_runs(chosen)
    more = run_all(ready, start=train, then=then)
    finished += [(run, record) for run, record in zip(ready, more) if record is not None]
    missing += [run for run, record in zip(ready, more) if record is None] + pending
    chosen = choose(finished + cv_runs, missing)
    scores = selection_scores(finished + cv_runs, missing)
  for (task, method), epsilon in sorted(chosen.items()):
    how = (f"by {FLAGS.cv_folds}-fold cross-validation" if cross_validates(task)
           else "on validation")
    print(f"{task} {method}: ε = {epsilon:g} chosen {how}.", flush=True)
  groups, selection = {}, []
  for run, record in finished:
    if run.selected:
      selection.append((run, record))
      if run.epsilon != chosen.get((run.task, run.method)):
        continue  # another candidate, or no choice yet (candidates still to run)
    groups.setdefault((run.task, run.variant), []).append(record)
  total = sum(record["wall_seconds"] for _, record in finished + cv_runs)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  if FLAGS.attack_only:  # the table's own section is its training invocation's
    attack_pass(finished, chosen)
    return
  write_markdown(groups, finished, selection, chosen, total, page(), missing, scores,
                 cv_runs)
  if groups:  # nothing to plot before the first run finishes
    plot(groups, os.path.join(FLAGS.out_dir, _plot_name()))
  print(f"Wrote {page()} and {_plot_name()} ({total / 60:.1f} min of runs, "
        f"{(time.time() - start) / 60:.1f} min in this invocation).", flush=True)
  if FLAGS.attack_budgets:
    attack_pass(finished, chosen)


if __name__ == "__main__":
  app.run(main)
