"""Shared parts of the result tables: one run per process, cached on disk; doc sections.

A `Run` is `python -m tfadv.main --gin_file=... --gin_param=...` in a
subprocess with its own model dir. Its result is the `eval_results.json` the
run writes plus the wall time the tool measured; a run whose model dir
already has both is read back, not repeated, so a killed table resumes.
"""

import concurrent.futures
import fcntl
import json
import os
import queue
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import app


# The ε binding of each method; the step sizes of the iterative methods scale
# with ε (the ratios of their configs).
EPSILON_BINDING = {"fgm": "EmbeddingFGM.epsilon", "gp": "EmbeddingGradientPenalty.epsilon",
                   "gp_matrix": "EmbeddingGradientPenalty.epsilon",
                   "fgm_output": "EmbeddingOutputFGM.epsilon",
                   "pgd_output": "EmbeddingOutputPGD.epsilon", "freelb": "FreeLB.epsilon",
                   "free_output": "EmbeddingOutputFree.epsilon",
                   # R3F has no ε ball: its selected value is the KL weight λ.
                   "r3f": "R3F.r3f_lambda"}
STEP_BINDING = {"pgd_output": ("EmbeddingOutputPGD.step_size", 0.5),
                "freelb": ("FreeLB.step_size", 0.4)}


class Run:
  """One run of a gin config in its own process: training and evaluation, or
  (`mode="evaluate"`) a further evaluation of a trained model dir."""

  save_wall_every = 5.0  # seconds between saves of a running run's wall time

  def __init__(self, name: str, gin_file: str, params: Sequence[str], work_dir: str,
               mode: str = "train_and_evaluate", tag: str = ""):
    self.name = name
    self.gin_file = gin_file
    self.params = list(params)
    self.model_dir = os.path.join(work_dir, name)
    self.mode = mode
    # An evaluation's `Experiment.eval_tag`: its records are its own
    # (`eval_results_<split>_<tag>.json`), beside the training's.
    self.tag = tag
    if tag:
      self.params.append(f"Experiment.eval_tag = '{tag}'")
    self.cpus = None  # CPU cores to pin the run to (taskset), or all

  @property
  def key(self) -> str:
    """The run's name in a `RecordStore`: its model dir's, and its tag."""
    return f"{self.name}/{self.tag}" if self.tag else self.name

  def command(self) -> List[str]:
    pin = ["taskset", "-c", ",".join(map(str, self.cpus))] if self.cpus else []
    mode = [] if self.mode == "train_and_evaluate" else [f"--mode={self.mode}"]
    return pin + ([sys.executable, "-m", "tfadv.main", f"--gin_file={self.gin_file}",
             f"--model_dir={self.model_dir}"] + mode
            + [f"--gin_param={p}" for p in self.params])

  def _wall_path(self, split: str) -> str:
    # A training run's wall time; a later evaluation's has its own file.
    name = ("wall_seconds.txt" if self.mode != "evaluate"
            else f"wall_seconds_{self._record(split)}.txt")
    return os.path.join(self.model_dir, name)

  def _record(self, split: str) -> str:
    # `tfadv.experiment.record_name`, which this TensorFlow-free module cannot import.
    return f"{split}_{self.tag}" if self.tag else split

  def result(self, split: str, on_line: Optional[Callable[[str], None]] = None) -> dict:
    """The run's evaluation of `split`; trains and evaluates unless a finished
    result is already on disk.

    Reads `eval_results_<split>.json` (`tfadv.experiment.write_eval_records`),
    which a later `--mode=evaluate` on another file cannot overwrite. Runs made
    before those records existed have only the training record
    `eval_results.json`; it is read when its split matches or is unnamed.
    `on_line` receives each line the run prints, as it prints it.
    """
    record = self.finished(split)
    if record is not None:
      return record
    os.makedirs(self.model_dir, exist_ok=True)
    # The wall time of earlier, killed invocations of this run: kept as it
    # goes, so a resumed run reports all of its time, not its last part's.
    partial = self._wall_path(split) + ".partial"
    before = 0.0
    if os.path.exists(partial):
      with open(partial) as f:
        before = float(f.read())  # written whole (os.replace), never empty
    start = last_saved = time.time()

    def save(path, now):
      with open(path + ".tmp", "w") as f:
        f.write(f"{before + now - start:.1f}\n")
      os.replace(path + ".tmp", path)

    # Appended: a resumed run keeps the log of its earlier part.
    with open(os.path.join(self.model_dir, "log.txt"), "a") as log:
      proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
      for line in proc.stdout:
        log.write(line)
        if time.time() - last_saved > self.save_wall_every:
          last_saved = time.time()
          save(partial, last_saved)
        if on_line is not None:
          on_line(line.rstrip("\n"))
      proc.wait()
    if proc.returncode != 0:
      save(partial, time.time())
      raise RuntimeError(f"Run {self.name} failed (exit {proc.returncode}); see "
                         f"{self.model_dir}/log.txt. Command: {shlex.join(self.command())}")
    save(self._wall_path(split), time.time())
    if os.path.exists(partial):
      os.remove(partial)
    record = self.finished(split)
    if record is None:
      raise RuntimeError(f"Run {self.name} exited without an evaluation of {split!r} "
                         f"in {self.model_dir}.")
    return record

  def finished(self, split: str) -> Optional[dict]:
    """The run's finished evaluation of `split` (with its wall time), or None
    while the run has not finished; starts nothing."""
    path = os.path.join(self.model_dir, f"eval_results_{self._record(split)}.json")
    wall_path = self._wall_path(split)
    if not os.path.exists(path) and os.path.exists(wall_path) and self.mode != "evaluate":
      path = os.path.join(self.model_dir, "eval_results.json")
    if not (os.path.exists(path) and os.path.exists(wall_path)):
      return None
    with open(path) as f:
      record = json.load(f)
    if record.setdefault("split", split) != split:
      raise RuntimeError(f"Run {self.name}: {path} records split {record['split']!r}, "
                         f"not {split!r}; delete {self.model_dir} to rerun it.")
    with open(wall_path) as f:
      record["wall_seconds"] = float(f.read())
    return record


class RecordStore:
  """Finished runs' records in one JSON file committed with the docs, so a
  table split across sessions or machines resumes from the repository alone
  (model dirs live on one machine's disk and die with it).

  Each record is kept under its run's name with the bindings it ran with
  (`params`); `get` returns it only for a run planned with the same
  bindings, so a changed run is run again. `put` merges under a file lock:
  several table processes may write at once.
  """

  def __init__(self, path: Optional[str]):
    self.path = path or None

  def load(self) -> Dict[str, dict]:
    if self.path and os.path.exists(self.path):
      with open(self.path) as f:
        return json.load(f)
    return {}

  def get(self, name: str, params: Sequence[str]) -> Optional[dict]:
    """The record kept for `name` if it ran with `params`, else None. Where
    the data lives is not a setting: a `data_dir` binding matches by its last
    folder (`../shared/data/fewclue/tnews` is `~/.cache/.../fewclue/tnews`)."""
    kept = self.load().get(name)
    if kept is None or kept.get("params") is None:
      return None
    return kept if _located(kept["params"]) == _located(params) else None

  def put(self, name: str, params: Sequence[str], record: dict) -> dict:
    """Keeps `record` (with `params`) under `name`; returns what was kept."""
    record = dict(record, params=list(params))
    if not self.path:
      return record
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    with open(self.path + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      saved = self.load()
      saved[name] = record
      with open(self.path + ".tmp", "w") as f:
        json.dump(saved, f, indent=1, sort_keys=True)
      os.replace(self.path + ".tmp", self.path)
    return record


_DATA_DIR = re.compile(r"^(\S+\.data_dir = )'(.*?)/*'$")


def _located(params: Sequence[str]) -> List[str]:
  """`params` with each `data_dir` binding's path cut to its last folder."""
  return [_DATA_DIR.sub(lambda m: f"{m.group(1)}'{os.path.basename(m.group(2))}'", p)
          for p in params]


def run_pinned(function: Callable, items: Sequence, jobs: int) -> list:
  """[function(item, cpus) for item in items], `jobs` at a time, each job
  pinned to its own core (`cpus` a one-core list; None with one job or too
  few cores), in order."""
  cores = sorted(os.sched_getaffinity(0))
  pinned = jobs > 1 and len(cores) >= jobs
  free_cores = queue.Queue()
  for core in cores[:jobs] if pinned else []:
    # One core per job: parallel runs do not fight over each other's threads.
    free_cores.put(core)

  def one(item):
    core = free_cores.get() if pinned else None
    try:
      return function(item, None if core is None else [core])
    finally:
      if core is not None:
        free_cores.put(core)

  with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
    return list(pool.map(one, items))


def parse_method_values(spec: str, flag: str, methods: Sequence[str]):
  """"method[@task,...]:v1,v2" -> (method, [task, ...] or None, [v1, v2]).

  Raises `absl.app.UsageError` naming `--flag` when the spec is malformed or
  the method is not among `methods`.

  >>> parse_method_values("gp@tnews:0.01,0.1", "sweep", ["fgm", "gp"])
  ('gp', ['tnews'], [0.01, 0.1])
  """
  target, _, text = spec.partition(":")
  method, _, tasks = target.partition("@")
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if method not in methods or not values:
    raise app.UsageError(f"--{flag}={spec!r}: expected METHOD[@task,...]:v1,v2,... "
                         f"with METHOD one of {list(methods)}.")
  return method, (tasks.split(",") if tasks else None), values


def choose_best(accuracies_by_value, tie: float = 0.0) -> float:
  """The value (an ε, say) of the best mean accuracy; the smaller on a tie.

  Means closer than `tie` to the best one tie with it (e.g. the standard
  error of one accuracy at the validation split's size, as the controls
  table's protocol fixes in advance): the smallest of the tied values wins.

  >>> choose_best({0.3: [0.50, 0.52], 1.0: [0.53, 0.49], 3.0: [0.40]})
  0.3
  >>> choose_best({0.3: [0.36], 1.0: [0.39], 3.0: [0.07]}, tie=0.036)
  0.3
  """
  means = {value: round(mean_std(accs)[0], 12) for value, accs in accuracies_by_value.items()}
  best = max(means.values())
  return min(value for value, mean in means.items() if mean > best - tie or mean == best)


def versus(values, baseline):
  """(difference of means, spread, verdict) of two groups of per-seed numbers.

  The spread is the sum of the two sample standard deviations: a difference
  beyond it means the mean ± std intervals do not overlap ("better" /
  "worse"); otherwise it is "inside the spread".

  >>> versus([39.0, 41.0, 43.0], [35.0, 36.0, 37.0])
  (5.0, 3.0, 'better')
  """
  (mean, std), (base, base_std) = mean_std(values), mean_std(baseline)
  spread = std + base_std
  verdict = ("better" if mean - base > spread else
             "worse" if base - mean > spread else "inside the spread")
  return mean - base, spread, verdict


def mean_std(values):
  """Mean and sample standard deviation (0 for one value)."""
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _markers(section: str) -> Tuple[str, str]:
  """The `<!-- section -->` and `<!-- /section -->` lines around a section."""
  return f"<!-- {section} -->", f"<!-- /{section} -->"


def replace_section(path: str, section: str, text: str,
                    title: str = "# Results") -> None:
  """Writes `text` between `<!-- section -->` markers of `path`, keeping the rest."""
  begin, end = _markers(section)
  block = f"{begin}\n{text.rstrip()}\n{end}"
  content = open(path).read() if os.path.exists(path) else f"{title}\n"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  if pattern.search(content):
    content = pattern.sub(lambda _: block, content)
  else:
    content = content.rstrip() + "\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(content)


# The header of the methods table's "ε chosen per task" table: written by
# `methods_table`, read back by `chosen_epsilons` (the configs' test).
CHOSEN_HEADER = "| task | method | ε | validation accuracy (%) by ε |"


def read_section(path: str, section: str) -> str:
  """The text between `<!-- section -->` markers of `path` (`replace_section`'s)."""
  with open(path) as f:
    return read_section_text(f.read(), section, path)


def read_section_text(content: str, section: str, where: str = "the text") -> str:
  """The text between `<!-- section -->` markers of `content`."""
  begin, end = _markers(section)
  if begin not in content or end not in content:
    raise ValueError(f"{where} has no section {section!r}.")
  return content.split(begin, 1)[1].split(end, 1)[0]


def chosen_epsilons(path: str, section: str) -> Dict[Tuple[str, str], float]:
  """{(task, method): ε} as the methods table recorded its choices in `section`."""
  text = read_section(path, section)
  if CHOSEN_HEADER not in text:
    raise ValueError(f"Section {section!r} of {path} records no chosen ε.")
  chosen = {}
  for line in text.split(CHOSEN_HEADER, 1)[1].splitlines()[2:]:
    if not line.startswith("|"):
      break
    task, method, epsilon = [cell.strip() for cell in line.strip("|").split("|")][:3]
    chosen[(task, method)] = float(epsilon)
  return chosen


# Flags that change where a table's page goes, where its data lives or how
# fast it is made, not what it holds: left out of the command a page prints,
# so that a page regenerated with `--report` (anywhere, with any --jobs) has
# no diff.
_PLACEMENT_FLAGS = ("--report", "--jobs", "--out_dir", "--data_dir")


def command_line(module: str) -> str:
  """The command that is running, as a user would type it (absl's argv has
  the flags removed, so this reads sys.argv), less `_PLACEMENT_FLAGS`: run
  as `... --flagfile=t.flags --jobs=2 --out_dir=/tmp/a --report`, a page
  prints `python -m <module> --flagfile=t.flags`."""
  kept = [a for a in sys.argv[1:]
          if a.split("=", 1)[0] not in _PLACEMENT_FLAGS + ("--noreport",)]
  return f"python -m {module} " + " ".join(shlex.quote(a) for a in kept)


def page_path(out_dir: str, section: str) -> str:
  """The page a table's tool writes: one file per table, `<out_dir>/<section>.md`
  (its attack pass, `<section>-attacks`, goes on the same page)."""
  return os.path.join(out_dir, f"{section}.md")
