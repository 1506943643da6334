"""Result-table plumbing: doc sections and cached runs."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from absl import app

from tfadv.tools import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_replace_section_keeps_the_other_sections(tmp_path):
  path = str(tmp_path / "results.md")
  runs.replace_section(path, "text", "## Text\nold")
  runs.replace_section(path, "vision", "## Vision\nrows")
  runs.replace_section(path, "text", "## Text\nnew")
  content = open(path).read()
  assert content.startswith("# Results\n")
  assert "old" not in content and content.index("new") < content.index("rows")
  assert content.count("<!-- text -->") == 1 and content.count("<!-- /vision -->") == 1


def test_a_page_prints_the_tables_command_without_where_it_went_or_how_fast(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["x", "--flagfile=t.flags", "--jobs=2", "--out_dir=/tmp/a",
                                    "--report", "--title=a b"])
  assert runs.command_line("tfadv.tools.methods_table") == (
      "python -m tfadv.tools.methods_table --flagfile=t.flags '--title=a b'")
  assert runs.page_path("docs/results", "t-x") == "docs/results/t-x.md"


def test_a_record_is_found_wherever_its_data_lives_and_only_with_its_settings(tmp_path):
  store = runs.RecordStore(str(tmp_path / "r.json"))
  store.put("a", ["Experiment.seed = 0", "ClueDataset.data_dir = '../shared/data/fewclue/tnews'"],
            {"accuracy": 0.5})
  moved = ["Experiment.seed = 0", "ClueDataset.data_dir = '/root/.cache/tfadv/fewclue/tnews/'"]
  assert store.get("a", moved)["accuracy"] == 0.5
  assert store.get("a", ["Experiment.seed = 0", "ClueDataset.data_dir = 'x/iflytek'"]) is None
  assert store.get("a", ["Experiment.seed = 1", moved[1]]) is None
  assert store.get("a", moved + ["EmbeddingFGM.epsilon = 1.0"]) is None


def test_a_finished_run_is_read_back_not_repeated(tmp_path):
  run = runs.Run("r", "configs/missing.gin", [], str(tmp_path))
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "eval_results.json").write_text(json.dumps({"accuracy": 0.5, "step": 3}))
  (tmp_path / "r" / "wall_seconds.txt").write_text("12.5\n")
  # The config does not exist: a subprocess would fail, so none was started.
  assert run.result("dev") == {"accuracy": 0.5, "step": 3, "split": "dev",
                               "wall_seconds": 12.5}
  # A split's own record wins over the training record.
  (tmp_path / "r" / "eval_results_test.json").write_text(
      json.dumps({"accuracy": 0.25, "step": 3, "split": "test"}))
  assert run.result("test")["accuracy"] == 0.25
  assert runs.mean_std([1.0, 3.0]) == (2.0, 2 ** 0.5)


class _Clock:
  """A fake `time.time` for runs.py: it advances only when told, so the wall
  time a run reports is exact, whatever the machine's load."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _fake_main(tmp_path, lines=4):
  """A stand-in for `tfadv.main`: prints `lines` lines; its first invocation
  fails, the next writes its evaluation."""
  script = tmp_path / "fake_main.py"
  script.write_text(
      "import json, os, sys\n"
      "d = sys.argv[1]\n"
      "first = not os.path.exists(os.path.join(d, 'started'))\n"
      "open(os.path.join(d, 'started'), 'w').close()\n"
      f"for _ in range({lines}):\n"
      "  print('step', flush=True)\n"
      "if first: sys.exit(1)\n"
      "json.dump({'accuracy': 0.5, 'step': 3}, open(os.path.join(d, 'eval_results.json'), 'w'))\n")

  class Fake(runs.Run):
    def command(self):
      return [sys.executable, str(script), self.model_dir]
  return Fake


def test_a_resumed_run_reports_the_wall_time_of_all_its_invocations(tmp_path, monkeypatch):
  """A run whose first invocation died (the tool killed, the run failed)
  reports the time of both invocations, not only the last one's: exact sums
  on a fake clock that advances 10 s per line the run prints."""
  clock = _Clock()
  monkeypatch.setattr(runs.time, "time", clock)

  def tick(line):
    clock.now += 10.0

  run = _fake_main(tmp_path)("r", "unused.gin", [], str(tmp_path))
  with pytest.raises(RuntimeError, match="failed"):
    run.result("dev", on_line=tick)
  partial = tmp_path / "r" / "wall_seconds.txt.partial"
  assert float(partial.read_text()) == 40.0  # 4 lines, saved at the failure
  record = run.result("dev", on_line=tick)
  assert record["wall_seconds"] == 80.0 and not partial.exists()
  assert float((tmp_path / "r" / "wall_seconds.txt").read_text()) == 80.0


@pytest.mark.parametrize("seconds_per_line,saved", [(5.5, 5.5), (5.0, None)])
def test_a_killed_tool_keeps_the_wall_time_saved_every_five_seconds(tmp_path, monkeypatch,
                                                                    seconds_per_line, saved):
  """The tool itself killed mid-run (its line callback raises at the second
  line): the time saved as the run went still counts. It is saved when more
  than `save_wall_every` (5 s) passed since the last save: at 5.5 s, not 5."""
  clock = _Clock()
  monkeypatch.setattr(runs.time, "time", clock)
  seen = []

  def killed(line):
    seen.append(line)
    clock.now += seconds_per_line
    if len(seen) == 2:
      raise KeyboardInterrupt

  run = _fake_main(tmp_path, lines=3)("r", "unused.gin", [], str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    run.result("dev", on_line=killed)
  partial = tmp_path / "r" / "wall_seconds.txt.partial"
  assert (float(partial.read_text()) if partial.exists() else None) == saved
  time.sleep(0.5)  # the orphaned invocation ends
  # Resumed: the saved part and the new invocation's (3 lines of 1 s).
  record = run.result("dev", on_line=lambda line: setattr(clock, "now", clock.now + 1.0))
  assert record["wall_seconds"] == (saved or 0.0) + 3.0 and not partial.exists()


def test_a_run_command_is_tfadv_main_with_its_mode_bindings_tag_and_pinning():
  run = runs.Run("r", "configs/x.gin", ["A.b = 1"], "work")
  assert run.command() == [sys.executable, "-m", "tfadv.main", "--gin_file=configs/x.gin",
                           "--model_dir=work/r", "--gin_param=A.b = 1"]
  run = runs.Run("r", "configs/x.gin", ["A.b = 1"], "work", mode="evaluate", tag="attacks")
  run.cpus = [0, 1]
  assert run.key == "r/attacks"
  assert run.command() == ["taskset", "-c", "0,1", sys.executable, "-m", "tfadv.main",
                           "--gin_file=configs/x.gin", "--model_dir=work/r", "--mode=evaluate",
                           "--gin_param=A.b = 1", "--gin_param=Experiment.eval_tag = 'attacks'"]


def test_iterative_methods_step_sizes_keep_their_configs_ratio_to_epsilon():
  """A table that moves ε moves the step size with it, at the ratio the
  method's config has (configs/base/*.gin, read here as the reference)."""
  import re  # pylint: disable=g-import-not-at-top
  for method, (binding, ratio) in runs.STEP_BINDING.items():
    with open(os.path.join(REPO, "configs", "base", f"{method}.gin")) as f:
      config = f.read()
    owner = binding.split(".")[0]
    value = lambda name: float(re.search(rf"^{owner}\.{name} = (\S+)$", config, re.M).group(1))
    assert ratio == value("step_size") / value("epsilon"), method
  assert set(runs.STEP_BINDING) == {"pgd_output", "freelb"}


def test_epsilon_is_chosen_by_mean_dev_accuracy_and_specs_are_checked():
  assert runs.choose_best({0.1: [0.40, 0.44], 0.3: [0.44, 0.40], 1.0: [0.2]}) == 0.1
  assert runs.choose_best({0.1: [0.40], 0.3: [0.46], 1.0: [0.45]}) == 0.3
  methods = ["fgm", "gp", "freelb"]
  assert runs.parse_method_values("gp@tnews,iflytek:0.01,0.1", "sweep", methods) == (
      "gp", ["tnews", "iflytek"], [0.01, 0.1])
  assert runs.parse_method_values("freelb:1", "select", methods) == ("freelb", None, [1.0])
  for bad in ("fgm", "fgm:", "fgm:a,b", "adv:0.1"):
    with pytest.raises(app.UsageError, match="--select="):
      runs.parse_method_values(bad, "select", methods)


def _workspace(tmp_path):
  """(work dir, out dir, data dir with an empty tnews/) of a table's test."""
  work, out, data = tmp_path / "runs", tmp_path / "docs", tmp_path / "data"
  work.mkdir()
  (data / "tnews").mkdir(parents=True)
  return work, out, data


def _finished_run(work_dir, name, validation, dev, step=300, train_seconds=None):
  path = work_dir / name
  path.mkdir()
  (path / "eval_results_dev.json").write_text(json.dumps({
      "accuracy": dev, "loss": 2.0, "step": step, "split": "dev",
      "best": {"step": step, "metrics": {"accuracy": validation, "loss": 2.0}},
      **({"train_seconds": train_seconds} if train_seconds else {})}))
  (path / "wall_seconds.txt").write_text("10.0\n")


def _plain_and_fgm_candidates(work):
  """Plain (dev 30%, 32%) and FGM ε ∈ {0.3, 1} on seeds 0 and 1: ε = 0.3 wins
  on validation (45% vs 41%) while ε = 1 is better on dev (40% vs 33%)."""
  for seed, dev in enumerate((0.30, 0.32)):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, dev)
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.45, 0.33)
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.41, 0.40)


def test_methods_table_chooses_on_validation_and_lists_each_run_once(tmp_path):
  """ε by mean validation accuracy even where dev disagrees; each run in one list."""
  work, out, data = _workspace(tmp_path)
  _plain_and_fgm_candidates(work)
  # Its own process, as users run it (its flags would clash with tfadv.main's here);
  # every run is read back, none trains.
  argv = [sys.executable, "-m", "tfadv.tools.methods_table", f"--work_dir={work}", f"--out_dir={out}", f"--data_dir={data}",
          "--tasks=tnews", "--methods=plain,fgm", "--seeds=0,1", "--select=fgm:0.3,1", "--cv_below=0",
          "--section=t"]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tnews fgm: ε = 0.3 chosen on validation." in proc.stdout
  text = (out / "t.md").read_text()
  assert "| plain | 31.00 ± 1.41 (n=2) |" in text
  assert "| fgm | 33.00 ± 0.00 (n=2) [+2.00] |" in text  # ε = 0.3's dev, not ε = 1's
  assert "| tnews | fgm | 0.3 | 0.3: 45.00, 1: 41.00 |" in text
  assert runs.chosen_epsilons(str(out / "t.md"), "t") == {("tnews", "fgm"): 0.3}
  assert text.count("| tnews | fgm ε=0.3 (chosen) |") == 2
  assert text.count("| tnews | fgm ε=1 |") == 2
  assert text.count("| tnews | plain |") == 2  # the other runs, once each
  assert "| tnews | fgm | 0 |" not in text
  assert (out / "results_t.png").exists()
  # --report starts nothing: a method with a candidate still to run gets no row
  # (the run is gone from its model dir and from the records).
  shutil.rmtree(work / "tnews_fgm_eps1_seed1")
  records = out / "t_runs.json"
  saved = json.loads(records.read_text())
  assert len(saved) == 6 and "EmbeddingFGM.epsilon = 1.0" in saved["tnews_fgm_eps1_seed1"]["params"]
  del saved["tnews_fgm_eps1_seed1"]
  records.write_text(json.dumps(saved))
  proc = subprocess.run(argv + ["--report"], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not (work / "tnews_fgm_eps1_seed1").exists()
  text = (out / "t.md").read_text()
  assert "| plain | 31.00 ± 1.41 (n=2) |" in text and "| fgm |" not in text
  assert "Not run yet (1 runs" in text and "TNEWS fgm (1)." in text
  assert text.count("| tnews | fgm ε=0.3 |") == 2  # listed, not chosen


def test_methods_table_gives_each_rows_training_time_and_its_ratio_to_plain(tmp_path):
  work, out, data = _workspace(tmp_path)
  for seed, (plain, fgm) in enumerate(((100.0, 180.0), (120.0, 260.0))):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, 0.31, train_seconds=plain)
    _finished_run(work, f"tnews_fgm_seed{seed}", 0.40, 0.33, train_seconds=fgm)
  _, text = _tool(work, out, data, "--methods=plain,fgm", "--cv_below=0", "--section=s",
                  "--report")
  assert "| plain | 110 s (1.00×) |" in text
  assert "| fgm | 220 s (2.00×) |" in text


def test_methods_table_runs_a_control_at_its_methods_chosen_epsilon(tmp_path):
  """A --variant with --same_epsilon waits for its method's choice, then runs
  (here: is read back) at exactly that ε, with its own bindings, as its own row."""
  work, out, data = _workspace(tmp_path)
  for seed in (0, 1):
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.45, 0.33)
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.41, 0.40)
  argv = [sys.executable, "-m", "tfadv.tools.methods_table", f"--work_dir={work}",
          f"--out_dir={out}", f"--data_dir={data}", "--tasks=tnews",
          "--methods=fgm,fgm_random", "--seeds=0,1", "--select=fgm:0.3,1", "--cv_below=0",
          "--variant=fgm_random=fgm:EmbeddingFGM.direction = 'random'",
          "--same_epsilon=fgm_random:fgm", "--section=c", "--report"]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (out / "c.md").read_text()
  assert "TNEWS fgm_random (2)." in text  # chosen ε known: its 2 runs are to come
  for seed in (0, 1):  # they ran (fabricated) at fgm's ε = 0.3, not at 1
    _finished_run(work, f"tnews_fgm_random_eps0.3_seed{seed}", 0.42, 0.31)
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (out / "c.md").read_text()
  assert "| fgm_random | 31.00 ± 0.00 (n=2) |" in text and "Not run yet" not in text
  # The run the table plans: fgm's config, its ε binding, the control's binding
  # (in its own process: the tool's flags would clash with other tools' here).
  probe = ("import sys; from tfadv.tools import methods_table as t; t.FLAGS(sys.argv); "
           "r = t.NlpRun('tnews', 'fgm_random', 0, 0.3, selected=True); "
           "print(r.gin_file, r.name, r.params, sep='\\n')")
  proc = subprocess.run([sys.executable, "-c", probe] + argv[3:-1], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  gin_file, name, params = proc.stdout.strip().split("\n")[-3:]
  assert gin_file.endswith("tnews_fgm.gin") and name == "tnews_fgm_random_eps0.3_seed0"
  assert "EmbeddingFGM.direction = 'random'" in params
  assert "EmbeddingFGM.epsilon = 0.3" in params


def test_candidates_within_the_tie_band_go_to_the_smallest_epsilon():
  # Means 36.1 / 38.9 / 6.7: 1 is best, 0.3 is within a 3.6-point band of it.
  by_eps = {0.3: [0.352, 0.380, 0.352], 1.0: [0.369, 0.363, 0.436], 3.0: [0.067] * 3}
  assert runs.choose_best(by_eps) == 1.0
  assert runs.choose_best(by_eps, tie=0.036) == 0.3
  assert runs.choose_best(by_eps, tie=0.02) == 1.0  # 2.8 points apart: no tie
  # The band is measured from the best mean, not chained from candidate to candidate.
  assert runs.choose_best({0.1: [0.30], 0.3: [0.33], 1.0: [0.36]}, tie=0.04) == 0.3
  assert runs.versus([39.0, 41.0, 43.0], [35.0, 36.0, 37.0]) == (5.0, 3.0, "better")
  assert runs.versus([35.0, 36.0, 37.0], [39.0, 41.0, 43.0])[2] == "worse"
  assert runs.versus([36.0, 41.0, 46.0], [35.0, 36.0, 37.0])[2] == "inside the spread"


def _tool(work, out, data, *flags):
  argv = [sys.executable, "-m", "tfadv.tools.methods_table", f"--work_dir={work}",
          f"--out_dir={out}", f"--data_dir={data}", "--tasks=tnews", "--seeds=0,1",
          *flags]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  section = [f.split("=", 1)[1] for f in flags if f.startswith("--section=")]
  return proc.stdout, (out / f"{section[0]}.md").read_text()


def test_methods_table_ties_choose_the_smaller_epsilon_and_compare_over_the_spread(tmp_path):
  work, out, data = _workspace(tmp_path)
  for seed, (plain, control) in enumerate(((0.30, 0.31), (0.32, 0.35))):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, plain)
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.43, 0.36)  # within 3 points
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.45, 0.40)
    _finished_run(work, f"tnews_fgm_random_eps0.3_seed{seed}", 0.40, control)
  flags = ["--methods=plain,fgm,fgm_random", "--select=fgm:0.3,1", "--cv_below=0",
           "--variant=fgm_random=fgm:EmbeddingFGM.direction = 'random'",
           "--same_epsilon=fgm_random:fgm", "--section=c", "--report",
           "--compare=fgm:fgm_random", "--compare=fgm:plain"]  # the second is there already
  stdout, text = _tool(work, out, data, *flags, "--tie=tnews:3")
  assert text.count("| TNEWS | fgm | plain |") == 1
  assert "tnews fgm: ε = 0.3 chosen on validation." in stdout
  assert "means within 3 points on TNEWS of the best tie with it" in text
  # fgm 36.00 ± 0 vs plain 31.00 ± 1.41: +5.00 beyond 1.41; vs its control
  # 33.00 ± 2.83: +3.00, just beyond 2.83; the control vs plain: +2.00 inside 4.24.
  assert "| TNEWS | fgm | plain | +5.00 | 1.41 | better |" in text
  assert "| TNEWS | fgm | fgm_random | +3.00 | 2.83 | better |" in text
  assert "| TNEWS | fgm_random | plain | +2.00 | 4.24 | inside the spread |" in text
  stdout, text = _tool(work, out, data, *flags, "--tie=tnews:1")
  assert "tnews fgm: ε = 1 chosen on validation." in stdout  # 2 points apart
  for bad in ("--tie=tnews", "--tie=tnews:x", "--tie=tnews:-1"):
    with pytest.raises(AssertionError, match="--tie="):
      _tool(work, out, data, *flags, bad)


def _attack_record(work, name, clean, under1, under2, success2=0.5):
  path = work / name
  (path / "eval_results_dev_attacks.json").write_text(json.dumps({
      "step": 300, "split": "dev", "tag": "attacks", "loss": 2.0, "accuracy": clean,
      "accuracy_sub1": under1, "accuracy_sub2": under2, "success_rate_sub1": 0.25,
      "success_rate_sub2": success2, "sub1_changed": 1.0, "sub2_changed": 1.5,
      "sub1_queries": 9.0, "sub2_queries": 17.0}))
  (path / "wall_seconds_dev_attacks.txt").write_text("60.0\n")


@pytest.mark.slow  # several tool processes: the full suite, not test-fast
def test_a_report_elsewhere_leaves_the_committed_records_byte_for_byte(tmp_path):
  # A clone elsewhere (FewCLUE at another path, no model dirs) regenerates the
  # pages from the records: it must not rewrite them (a report once rewrote
  # every attack record's data_dir binding to the clone's absolute path).
  work, out, data = _workspace(tmp_path)
  for seed in (0, 1):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, 0.31)
    _attack_record(work, f"tnews_plain_seed{seed}", 0.31, 0.20, 0.10)
  records = tmp_path / "records.json"
  flags = ["--methods=plain", "--section=a", "--attack_budgets=1,2", f"--records={records}",
           "--report"]
  _, first = _tool(work, out, data, *flags)
  kept = records.read_bytes()
  assert b"tnews_plain_seed1/attacks" in kept and str(data).encode() in kept
  shutil.rmtree(work)
  work.mkdir()
  elsewhere = tmp_path / "elsewhere" / "fewclue"
  (elsewhere / "tnews").mkdir(parents=True)
  _, again = _tool(work, out, elsewhere, *flags)
  assert records.read_bytes() == kept
  assert again == first


def test_attack_pass_evaluates_each_chosen_run_with_textattack_metrics(tmp_path):
  work, out, data = _workspace(tmp_path)
  for seed in (0, 1):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, 0.31)
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.45, 0.36)
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.41, 0.40)
  _attack_record(work, "tnews_plain_seed0", 0.31, 0.20, 0.10)
  _attack_record(work, "tnews_plain_seed1", 0.31, 0.22, 0.12)
  _attack_record(work, "tnews_fgm_eps0.3_seed0", 0.36, 0.31, 0.20, success2=0.4)
  _attack_record(work, "tnews_fgm_eps1_seed0", 0.40, 0.39, 0.38)  # not chosen: unread
  flags = ["--methods=plain,fgm", "--select=fgm:0.3,1", "--cv_below=0", "--section=a",
           "--attack_budgets=1,2", "--attack_only", "--report"]
  stdout, text = _tool(work, out, data, *flags)
  assert "Wrote the attack section" in stdout
  section = runs.read_section(str(out / "a.md"), "a-attacks")
  assert "<!-- a -->" not in text  # --attack_only leaves the table's own section alone
  head = ("| method | clean | under B=1 | success B=1 | chars B=1 | queries B=1 | "
          "under B=2 | success B=2 | chars B=2 | queries B=2 |")
  assert head in section
  assert ("| plain (n=2) | 31.00 ± 0.00 | 21.00 ± 1.41 | 25.00 ± 0.00 | 1.00 ± 0.00 | "
          "9.00 ± 0.00 | 11.00 ± 1.41 | 50.00 ± 0.00 | 1.50 ± 0.00 | 17.00 ± 0.00 |") in section
  assert "| fgm (n=1) | 36.00 ± 0.00 | 31.00 ± 0.00 | 25.00 ± 0.00 |" in section
  assert "38.00" not in section  # the unchosen ε = 1 run
  assert "| TNEWS | fgm | plain | +9.00 | 1.41 | better |" in section
  assert "dev accuracy under the 2-character attack" in section
  assert "dev accuracy under the 1-character attack" in section  # each budget
  assert "| TNEWS | fgm | plain | +10.00 | 1.41 | better |" in section  # B = 1
  assert "| tnews | fgm | 0 | 36.00 | 31.00 / 1.00 / 9.00 | 20.00 / 1.50 / 17.00 | 60 s |" in section
  assert "Not evaluated yet (1 runs" in section
  # The evaluation the pass starts: the training run's config and bindings, the
  # scoped attacks, its own records (its own process: flags clash here).
  probe = ("import sys; from tfadv.tools import methods_table as t; t.FLAGS(sys.argv); "
           "r = t.attack_run(t.NlpRun('tnews', 'fgm', 1, 0.3, selected=True)); "
           "print(r.gin_file, r.model_dir, r.mode, r.params, "
           "r._wall_path('dev'), sep='\\n')")
  proc = subprocess.run([sys.executable, "-c", probe, f"--work_dir={work}",
                         "--attack_budgets=1,2", "--attack_examples=7"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  gin_file, model_dir, mode, params, wall = proc.stdout.strip().split("\n")[-5:]
  assert gin_file.endswith("tnews_fgm.gin") and mode == "evaluate"
  assert model_dir.endswith("tnews_fgm_eps0.3_seed1")
  assert wall.endswith("wall_seconds_dev_attacks.txt")
  for binding in ("Experiment.eval_attacks = {'sub1': @sub1/CharSubstitutionAttack(), "
                  "'sub2': @sub2/CharSubstitutionAttack()}",
                  "sub1/CharSubstitutionAttack.budget = 1",
                  "sub2/CharSubstitutionAttack.budget = 2",
                  "Experiment.attack_examples = 7", "Experiment.eval_tag = 'attacks'",
                  "EmbeddingFGM.epsilon = 0.3", "Experiment.seed = 1"):
    assert binding in params


def test_attack_pass_reports_the_tight_search_beside_greedy_and_smoothing(tmp_path):
  """--attack_searches=greedy,beam adds sub<B>_beam with its share of greedy's
  standing examples broken (1 − beam / greedy, per seed); --attack_smoothing
  the smoothed and certified accuracies; --attack_gin_param binds the
  evaluations only (here the first 5 dev records: split dev_first5)."""
  work, out, data = _workspace(tmp_path)
  for seed, (greedy, beam) in enumerate(((0.20, 0.10), (0.25, 0.15))):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, 0.31)
    (work / f"tnews_plain_seed{seed}" / "eval_results_dev_first5_attacks.json").write_text(
        json.dumps({"step": 300, "split": "dev_first5", "accuracy": 0.4,
                    "accuracy_sub1": greedy, "accuracy_sub1_beam": beam,
                    "sub1_queries": 9.0, "sub1_beam_queries": 300.0,
                    "accuracy_smooth": 0.35, "smooth_certified1": 0.1 * (seed + 1),
                    "smooth_certified2": 0.0}))
    (work / f"tnews_plain_seed{seed}" / "wall_seconds_dev_first5_attacks.txt").write_text("9\n")
  flags = ["--methods=plain", "--cv_below=0", "--section=b", "--attack_budgets=1",
           "--attack_searches=greedy,beam", "--attack_smoothing",
           "--attack_gin_param=ClueDataset.num_eval = 5", "--attack_only", "--report"]
  _, text = _tool(work, out, data, *flags)
  section = runs.read_section(str(out / "b.md"), "b-attacks")
  assert ("| method | clean | under B=1 | success B=1 | chars B=1 | queries B=1 | beam B=1 | "
          "beam breaks B=1 | beam queries B=1 | smoothed | certified 1 | certified 2 |") in section
  # beam 12.50 ± 3.54; breaks: 1 − 0.10/0.20 = 50%, 1 − 0.15/0.25 = 40%: 45.00 ± 7.07.
  assert ("| plain (n=2) | 40.00 ± 0.00 | 22.50 ± 3.54 | – | – | 9.00 ± 0.00 | 12.50 ± 3.54 | "
          "45.00 ± 7.07 | 300.00 ± 0.00 | 35.00 ± 0.00 | 15.00 ± 7.07 | 0.00 ± 0.00 |") in section
  assert "| tnews | plain | 1 | 40.00 | 25.00 / – / 9.00 | 15.00 / 300.00 | 35.00 / 20.00 / 0.00 |" in section
  # The text names what was attacked and the budget rule in force: TNEWS's
  # config binds 'floor' (configs/base/clue.gin), a --gin_param 'ceil'.
  assert "evaluated again on the first 5 dev records" in section
  assert "at most 10% of the sentence's, by" in section
  _, text = _tool(work, out, data, *flags, "--gin_param=CharSubstitutionAttack.budget_rule = 'ceil'")
  assert ("at most max(ceil(10% of the sentence's characters), 1) (TextAttack's rule)"
          in runs.read_section(str(out / "b.md"), "b-attacks"))
  probe = ("import sys; from tfadv.tools import methods_table as t; t.FLAGS(sys.argv); "
           "r = t.attack_run(t.NlpRun('iflytek', 'plain', 0)); print(r.params)")
  proc = subprocess.run([sys.executable, "-c", probe, f"--work_dir={work}", "--attack_budgets=2",
                         "--attack_searches=beam", "--attack_smoothing",
                         "--attack_gin_param=tnews:ClueDataset.num_eval = 5",
                         "--attack_gin_param=iflytek:ClueDataset.num_eval = 7"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  params = proc.stdout.strip().split("\n")[-1]
  for binding in ("Experiment.eval_attacks = {'sub2_beam': @sub2_beam/CharSubstitutionAttack(), "
                  "'smooth': @smooth/SubstitutionSmoothing()}",
                  "sub2_beam/CharSubstitutionAttack.budget = 2",
                  "sub2_beam/CharSubstitutionAttack.search = 'beam'",
                  "ClueDataset.num_eval = 7"):
    assert binding in params
  assert "num_eval = 5" not in params


def test_methods_table_records_survive_the_model_dirs_and_other_bindings_run_again(tmp_path):
  work, out, data = _workspace(tmp_path)
  _plain_and_fgm_candidates(work)
  flags = ["--methods=plain,fgm", "--select=fgm:0.3,1", "--cv_below=0", "--section=r", "--report"]
  _, text = _tool(work, out, data, *flags)
  assert "| fgm | 33.00 ± 0.00 (n=2) [+2.00] |" in text and "Not run yet" not in text
  saved = json.loads((out / "r_runs.json").read_text())
  assert sorted(saved) == sorted(f"tnews_{m}_seed{s}" for m in ("plain", "fgm_eps0.3", "fgm_eps1")
                                 for s in (0, 1))
  # Another machine: no model dirs, the committed records alone rebuild the table.
  shutil.rmtree(work)
  work.mkdir()
  _, again = _tool(work, out, data, *flags)
  assert "| fgm | 33.00 ± 0.00 (n=2) [+2.00] |" in again and "Not run yet" not in again
  assert "| tnews | fgm | 0.3 | 0.3: 45.00, 1: 41.00 |" in again
  # Other bindings are other runs: the records do not count for them.
  _, other = _tool(work, out, data, *flags, "--gin_param=adamw.learning_rate = 0.01")
  assert "Not run yet (6 runs" in other and "| fgm |" not in other


FAKE_MAIN = """
import json, os, sys
model_dir, mode = sys.argv[1], sys.argv[2]
os.makedirs(model_dir, exist_ok=True)
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(f"{mode} {os.path.basename(model_dir)}\\n")
accuracy = {"0": 0.30, "1": 0.31, "2": 0.32}[model_dir[-1]]
if mode == "evaluate":
  json.dump({"accuracy": accuracy, "accuracy_sub1": accuracy / 2, "success_rate_sub1": 0.5,
             "sub1_changed": 1.0, "sub1_queries": 9.0, "split": "dev", "step": 3},
            open(os.path.join(model_dir, "eval_results_dev_attacks.json"), "w"))
else:
  json.dump({"accuracy": accuracy, "loss": 2.0, "step": 3, "split": "dev"},
            open(os.path.join(model_dir, "eval_results_dev.json"), "w"))
"""

PROBE = """
import sys
from absl import app
from tfadv.tools import methods_table, runs
fake = sys.argv.pop(1)
runs.Run.command = lambda self: [sys.executable, fake, self.model_dir, self.mode]
app.run(methods_table.main)
"""


@pytest.mark.slow  # several tool processes: the full suite, not test-fast
def test_attack_pass_attacks_each_run_as_it_trains_and_trains_again_a_run_whose_dir_is_gone(
    tmp_path, monkeypatch):
  """A run trained here is attacked at once, on its model dir; a chosen run
  kept only in the records (its model dir lost with its machine) is trained
  again before its attack, and a rerun that differs from its record says so."""
  work, out, data = _workspace(tmp_path)
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  (tmp_path / "probe.py").write_text(PROBE)
  log = tmp_path / "log.txt"
  monkeypatch.setenv("FAKE_LOG", str(log))
  argv = [sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "fake_main.py"),
          f"--work_dir={work}", f"--out_dir={out}", f"--data_dir={data}", "--tasks=tnews",
          "--seeds=0,1,2", "--methods=plain", "--section=k", "--attack_budgets=1", "--jobs=1"]
  # Seeds 0 and 1 are kept (seed 0 as 29%: its rerun will differ); seed 2 is new.
  probe = ("import sys; from tfadv.tools import methods_table as t; t.FLAGS(sys.argv); "
           "s = t.record_store(); r = [t.NlpRun('tnews', 'plain', i) for i in (0, 1)]; "
           "s.put(r[0].key, r[0].params, {'accuracy': 0.29, 'loss': 2.0, 'step': 3, "
           "'split': 'dev', 'wall_seconds': 5.0}); "
           "s.put(r[1].key, r[1].params, {'accuracy': 0.31, 'loss': 2.0, 'step': 3, "
           "'split': 'dev', 'wall_seconds': 5.0})")
  proc = subprocess.run([sys.executable, "-c", probe] + argv[3:], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert log.read_text().split("\n")[:-1] == [
      "train_and_evaluate tnews_plain_seed2", "evaluate tnews_plain_seed2",  # at once
      "train_and_evaluate tnews_plain_seed0", "evaluate tnews_plain_seed0",  # dir gone
      "train_and_evaluate tnews_plain_seed1", "evaluate tnews_plain_seed1"]
  assert "tnews_plain_seed0: trained again, dev accuracy 30.00% (kept record: 29.00%)" \
      in proc.stdout
  assert "seed1: trained again" not in proc.stdout  # the same as its record
  saved = json.loads((out / "k_runs.json").read_text())
  assert saved["tnews_plain_seed0"]["accuracy"] == 0.30  # the rerun replaced it
  assert saved["tnews_plain_seed2/attacks"]["accuracy_sub1"] == 0.16
  # Everything is in the records now: another machine starts nothing.
  shutil.rmtree(work)
  log.unlink()
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not log.exists()
  section = runs.read_section(str(out / "k.md"), "k-attacks")
  assert "| plain (n=3) | 31.00 ± 1.00 | 15.50 ± 0.50 | 50.00 ± 0.00 |" in section


def test_transcribed_runs_rebuild_the_section_they_were_read_from(tmp_path):
  """Runs whose model dirs and records were lost come back from the per-run
  lists of a committed section, marked as transcribed, with the same choice,
  means and attack metrics (success rate = 1 − under attack / clean)."""
  repo = tmp_path / "repo"
  repo.mkdir()
  work, out, data = _workspace(repo)
  for seed in (0, 1):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, 0.30 + 0.02 * seed)
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.45, 0.36)
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.41, 0.40)
    _attack_record(work, f"tnews_plain_seed{seed}", 0.30 + 0.02 * seed, 0.15, 0.06)
    _attack_record(work, f"tnews_fgm_eps0.3_seed{seed}", 0.36, 0.18, 0.09)
  flags = [f"--work_dir={work}", f"--data_dir={data}", "--out_dir=docs", "--tasks=tnews",
           "--seeds=0,1", "--methods=plain,fgm", "--select=fgm:0.3,1", "--cv_below=0", "--section=x",
           "--attack_budgets=1,2"]

  def tool(*extra):
    proc = subprocess.run([sys.executable, "-m", "tfadv.tools.methods_table", *flags, *extra],
                          capture_output=True, text=True, check=False, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout

  tool("--report")
  before = (out / "x.md").read_text()
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
  subprocess.run(git[:-2] + ["init", "-q", str(repo)], check=True)
  subprocess.run(git + ["add", "docs/x.md"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "table"], check=True)
  shutil.rmtree(work)
  work.mkdir()
  (out / "x_runs.json").unlink()
  assert "Kept 6 runs and 4 attack evaluations of HEAD:docs/x.md" in tool(
      "--transcribe_from=HEAD")
  stdout = tool("--report")
  assert "tnews fgm: ε = 0.3 chosen on validation." in stdout
  after = (out / "x.md").read_text()
  for line in ("| plain | 31.00 ± 1.41 (n=2) |", "| fgm | 36.00 ± 0.00 (n=2) [+5.00] |",
               "| tnews | fgm | 0.3 | 0.3: 45.00, 1: 41.00 |",
               "| TNEWS | fgm | plain | +5.00 | 1.41 | better |",
               "| TNEWS | fgm | plain | +3.00 | 0.00 | better |"):  # under 1 character
    assert line in before and line in after
  assert "| tnews | fgm ε=0.3 (chosen) | 0 † | 45.00 | 36.00 |" in after
  assert "Transcribed from this section's per-run list" in after
  # Success rates follow from clean and under-attack accuracy (the fabricated
  # records said 25%); characters changed and queries are read from the list.
  assert ("| fgm (n=2) | 36.00 ± 0.00 | 18.00 ± 0.00 | 50.00 ± 0.00 | 1.00 ± 0.00 | "
          "9.00 ± 0.00 |") in after
  # A commit from before one page per table kept every section in docs/results.md.
  subprocess.run(git + ["mv", "docs/x.md", "docs/results.md"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "one file"], check=True)
  (out / "x_runs.json").unlink()
  assert "Kept 6 runs and 4 attack evaluations of HEAD:docs/results.md" in tool(
      "--transcribe_from=HEAD")


def test_demo_prints_each_run_its_progress_and_a_table_over_seeds(tmp_path):
  from tfadv.tools import demo  # pylint: disable=g-import-not-at-top
  models = demo.plan(str(tmp_path), 0.01, ["0", "1"])
  assert list(models) == ["output FGM, ε = 0.01", "plain"]
  assert [run.name for run in models["plain"]] == ["plain_seed0", "plain_seed1"]
  assert "Experiment.seed = 1" in models["plain"][1].params
  assert "EmbeddingOutputFGM.epsilon = 0.01" in models["output FGM, ε = 0.01"][0].params
  # Finished runs (fabricated): read back, nothing started.
  values = {"fgm_output_eps0.01_seed0": (0.80, 0.81, 0.66, 0.5),
            "fgm_output_eps0.01_seed1": (0.79, 0.80, 0.64, 0.4),
            "plain_seed0": (0.80, 0.80, 0.61, 0.3), "plain_seed1": (0.81, 0.79, 0.60, None)}
  for name, (validation, test, attacked, substituted) in values.items():
    (tmp_path / name).mkdir()
    record = {"accuracy": test, "accuracy_pgd5": attacked, "split": "test", "step": 500,
              "best": {"step": 500, "metrics": {"accuracy": validation}}}
    if substituted is not None:  # plain_seed1: a run from before the column
      record["accuracy_sub2"] = substituted
    (tmp_path / name / "eval_results_test.json").write_text(json.dumps(record))
    (tmp_path / name / "wall_seconds.txt").write_text("100\n")
  proc = subprocess.run([sys.executable, "-m", "tfadv.tools.demo", f"--work_dir={tmp_path}"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "started" not in proc.stdout
  assert "| output FGM, ε = 0.01 | 79.50% (80.00, 79.00) | 80.50% (81.00, 80.00) | " \
         "65.00% (66.00, 64.00) | 45.00% (50.00, 40.00) |" in proc.stdout
  assert "| plain | 80.50% (80.00, 81.00) | 79.50% (80.00, 79.00) | 60.50% (61.00, 60.00) " \
         "| – |" in proc.stdout
  # Progress: every 100th step line (step, loss, ETA) and each validation, by run name.
  printed = []
  show = demo.progress_printer(models["plain"][0], threading.Lock(), printed.append)
  for step in (50, 100):
    show(f"step {step}/500 | loss 0.6 | accuracy 0.7 | lr 1e-3 | 90.0 examples/sec | ETA 1m")
  show("validation at step 250 | loss 0.5 | accuracy 0.8 | best 0.8 at step 250 (new)")
  show("I1130 some log line")
  assert printed == ["[plain_seed0] step 100/500 | loss 0.6 | ETA 1m",
                     "[plain_seed0] validation at step 250 | loss 0.5 | accuracy 0.8 | best 0.8 "
                     "at step 250 (new)"]


def test_vision_table_means_targets_and_records_that_survive_the_model_dirs(tmp_path):
  """Mean ± std per row, the issue's targets on the means, and the records
  file: a table resumes from it when the model dirs are gone, and a record
  made with other bindings is not reused."""
  work, out = tmp_path / "runs", tmp_path / "docs"
  records = tmp_path / "records.json"
  # (robust, train seconds) per seed; PGD-7 also gets a PGD-50×10 record.
  rows = {"pgd7": [(0.67, 2400.0), (0.69, 2400.0)], "free8": [(0.675, 360.0), (0.675, 360.0)],
          "atta": [(0.60, 500.0), (0.62, 500.0)], "free4": [(0.68, 600.0), (0.68, 600.0)]}
  for row, values in rows.items():
    for seed, (robust, seconds) in enumerate(values):
      path = work / f"{row}_seed{seed}"
      path.mkdir(parents=True)
      (path / "eval_results_test.json").write_text(json.dumps({
          "accuracy": 0.85, "accuracy_fgsm": 0.75, "accuracy_pgd20": robust + 0.01,
          "accuracy_apgd_ce": robust, "accuracy_apgd_dlr": robust,
          "accuracy_worst_case": robust, "train_seconds": seconds, "train_stuck": 0.0,
          "split": "test", "step": 3750}))
      (path / "wall_seconds.txt").write_text("100\n")
      (path / "eval_results_test_first2000.json").write_text(json.dumps({
          "accuracy": 0.86, "accuracy_pgd50x10": robust - 0.01, "split": "test_first2000",
          "step": 3750}))
      (path / "wall_seconds_test_first2000.txt").write_text("50\n")
  argv = [sys.executable, "-m", "tfadv.tools.robustness_table", f"--work_dir={work}",
          f"--out_dir={out}", "--rows=pgd7,free8,atta,free4", "--seeds=0,1",
          f"--records={records}", "--config_dir=/nonexistent"]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (out / "vision-robustness-table.md").read_text()
  assert "| pgd7 | 2 | 85.00 ± 0.00 |" in text and "**68.00 ± 1.41**" in text
  assert "67.00 ± 1.41 | 0.0 ± 0.0 | 40.0 ± 0.0 |" in text  # PGD-50×10, stuck, minutes
  # Free-8: 0.50 points under PGD-7 at 0.150×: met; ATTA: 7 points under: missed.
  assert "- free8: worst-case robust 67.50% vs PGD-7's 68.00% (PGD-7 minus free8: " \
         "+0.50 points) at 0.150× PGD-7's compiled training time (target: within 1.0 " \
         "point at ≤ 0.167×): met (2 seeds)." in text
  assert "- atta: worst-case robust 61.00%" in text and "≤ 0.250×): missed" in text
  # Free-4 as robust as PGD-7 but at 0.25× its time: missed on time.
  assert "(PGD-7 minus free4: +0.00 points) at 0.250×" in text
  assert "≤ 0.167×): missed (2 seeds)." in text
  assert "Runs so far: 8 of 8" in text
  saved = json.loads(records.read_text())
  assert set(saved) == {f"{row}_seed{s}" for row in rows for s in (0, 1)}
  assert "Experiment.seed = 1" in saved["atta_seed1"]["params"]
  # The model dirs are gone (another machine): the records alone rebuild the table.
  shutil.rmtree(work)
  (out / "vision-robustness-table.md").unlink()
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "**68.00 ± 1.41**" in (out / "vision-robustness-table.md").read_text()
  # Other bindings: the records do not count, and --report starts nothing.
  proc = subprocess.run(argv + ["--gin_param=adamw.learning_rate = 0.01", "--report"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (out / "vision-robustness-table.md").read_text()
  assert "Runs so far: 0 of 8" in text
  assert "not yet run: seed 0: all 4 rows; seed 1: all 4 rows." in text


def test_vision_selection_reads_validation_only_and_the_incumbent_wins_a_tie(tmp_path):
  """`--validation_fraction`: runs train on train less validation
  (`--mode=train`), the section reads `eval_results_validation.json` only (a
  test record beside it is ignored), and the rule fixed before the runs
  picks the incumbent unless a challenger's mean is more than `--tie` points
  higher."""
  work, out = tmp_path / "runs", tmp_path / "docs"

  def write(robust_by_row):
    for row, values in robust_by_row.items():
      for seed, robust in enumerate(values):
        path = work / f"{row}_seed{seed}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "eval_results_validation.json").write_text(json.dumps({
            "accuracy": 0.80, "accuracy_worst_case": robust, "train_seconds": 300.0,
            "split": "validation", "step": 3375}))
        # A test record that would flip the choice if it were read.
        (path / "eval_results_test.json").write_text(json.dumps({
            "accuracy": 0.80, "accuracy_worst_case": 1.0 - robust, "split": "test",
            "step": 3375}))
        (path / "wall_seconds.txt").write_text("100\n")

  def select(*extra):
    argv = [sys.executable, "-m", "tfadv.tools.robustness_table", f"--work_dir={work}",
            f"--out_dir={out}", "--rows=free8,free8_straight_through", "--seeds=0,1",
            "--records=", "--config_dir=/nonexistent", "--validation_fraction=0.1",
            "--tie=0.6", "--report", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / "vision-validation-selection.md").read_text()

  # Straight-through 0.5 points higher: inside the band, the incumbent stays.
  write({"free8": [0.670, 0.672], "free8_straight_through": [0.675, 0.677]})
  text = select()
  assert "| free8 | 2 | 80.00 ± 0.00 | **67.10 ± 0.14** | 67.00, 67.20 | 5.0 ± 0.0 min |" in text
  assert "Chosen: **free8**." in text and "Runs: 4 of 4" in text
  assert "Chosen: **free8_straight_through**." in select("--tie=0")  # no band: the best
  # 0.7 points higher: beyond the band, the challenger wins.
  write({"free8": [0.670, 0.672], "free8_straight_through": [0.677, 0.679]})
  assert "Chosen: **free8_straight_through**." in select()
  # A missing run: no choice yet.
  (work / "free8_seed1" / "wall_seconds.txt").unlink()
  text = select()
  assert "Runs: 3 of 4" in text and "Chosen: – (not every run has finished)." in text


@pytest.mark.slow  # several tool processes: the full suite, not test-fast
def test_methods_table_cross_validates_a_small_task_and_reports_each_folds_choice(tmp_path):
  """TNEWS's 15% validation split is under --cv_below records: the ε is the
  best mean over K folds of train (the fold runs, fabricated here), not the
  validation split's choice; the dev row is the chosen ε's; each fold's own
  choice is listed."""
  work, out, data = _workspace(tmp_path)
  (data / "tnews" / "train.json").write_text('{"sentence": "x", "label": "1"}\n' * 100)
  _plain_and_fgm_candidates(work)  # the validation split prefers 0.3 (45 vs 41)
  # Folds: 1 wins on three of four folds, 0.3 on one; means 41.5 vs 43.75.
  for fold, (low, high) in enumerate([(0.40, 0.45), (0.41, 0.44), (0.42, 0.40), (0.43, 0.46)]):
    _finished_run(work, f"tnews_fgm_eps0.3_fold{fold}_seed0", low, 0.0)
    _finished_run(work, f"tnews_fgm_eps1_fold{fold}_seed0", high, 0.0)
  flags = ["--methods=plain,fgm", "--select=fgm:0.3,1", "--cv_folds=4", "--section=v"]
  stdout, text = _tool(work, out, data, *flags)
  assert "tnews fgm: ε = 1 chosen by 4-fold cross-validation." in stdout
  assert "| fgm | 40.00 ± 0.00 (n=2) [+9.00] |" in text  # ε = 1's dev runs
  assert "| tnews | fgm | 1 | 0.3: 41.50, 1: 43.75 |" in text
  assert "| tnews | fgm | 1 | 1, 1, 0.3, 1 | 3 of 4 |" in text
  assert "by 4-fold cross-validation over train" in text
  assert "fold" not in text.split("Every ε candidate")[1]  # fold runs are not rows
  # The fold runs bind the fold; a missing fold leaves the choice open.
  (work / "tnews_fgm_eps1_fold3_seed0" / "eval_results_dev.json").unlink()
  (out / "v_runs.json").unlink()
  stdout, text = _tool(work, out, data, *flags, "--report")
  assert "chosen" not in stdout and "TNEWS fgm (1)" in text
  probe = ("import sys; from tfadv.tools import methods_table as t; t.FLAGS(sys.argv); "
           "r = t.NlpRun('tnews', 'fgm', 0, 1.0, selected=True, fold=2); print(r.name, r.params)")
  proc = subprocess.run([sys.executable, "-c", probe, f"--data_dir={data}", "--cv_folds=4"],
                        capture_output=True, text=True, check=False)
  assert "tnews_fgm_eps1_fold2_seed0" in proc.stdout
  assert "ClueDataset.num_folds = 4" in proc.stdout and "ClueDataset.validation_fold = 2" in proc.stdout
  # With cross-validation off, the validation split chooses 0.3 as before.
  (out / "v_runs.json").unlink()
  stdout, _ = _tool(work, out, data, *flags, "--cv_below=0")
  assert "tnews fgm: ε = 0.3 chosen on validation." in stdout


def test_the_controls_tables_spec_file_yields_its_recorded_runs():
  """configs/tables/text_controls.flags is the table: every run it plans, the
  controls at their method's chosen ε and every attack evaluation are in the
  committed records under the same name with the same bindings."""
  probe = """
import sys
from tfadv.tools import methods_table as t
t.FLAGS(["x", "--flagfile=configs/tables/text_controls.flags"])
store = t.record_store()
planned = t.planned_runs()
records = [store.get(run.key, run.params) for run in planned]
absent = [run.key for run, r in zip(planned, records) if r is None]
finished = [(run, r) for run, r in zip(planned, records) if r is not None]
ready, pending = t.dependent_runs(t.choose(finished, []))
absent += [run.key for run in ready if store.get(run.key, run.params) is None]
chosen = t.choose(finished + [(run, store.get(run.key, run.params)) for run in ready], [])
attacked = [run for run in [r for r, _ in finished] + ready if t.attacked(run)
            and (not run.selected or run.epsilon == chosen.get((run.task, run.method)))]
absent += [t.attack_run(run).key for run in attacked
           if store.get(t.attack_run(run).key, t.attack_run(run).params) is None]
print(len(planned), len(ready), len(pending), len(attacked), len(store.load()), absent)
"""
  proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  planned, ready, pending, attacked, stored, absent = proc.stdout.strip().splitlines()[-1].split(
      " ", 5)
  assert absent == "[]", absent
  assert (int(planned), int(ready), int(pending), int(attacked)) == (168, 12, 0, 72)
  assert int(planned) + int(ready) + int(attacked) <= int(stored)


def _mutation_tool():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mutation.py")
  spec = importlib.util.spec_from_file_location("tfadv_mutation_tool", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_mutation_report_is_written_from_every_files_record_and_marks_a_changed_source(tmp_path):
  """`tests/mutation.py` keeps each file's result in a record; the report has a
  row per record (not only the files of the last run), counts the explained
  survivors, and marks a source that changed after it was measured."""
  m = _mutation_tool()
  records = str(tmp_path / "mutation_runs.json")
  survivor = "@@ -1 +1 @@\n-  if x > 1:\n+  if across_replicas and context is not None and " \
             "context.num_replicas_in_sync >= 1:\n"
  for source, digest in (("tfadv/loss_scaling.py", m.blob_hash("tfadv/loss_scaling.py")),
                         ("tfadv/tools/runs.py", "0" * 40), ("tfadv/removed.py", "0" * 40)):
    m.save_record({"key": source, "source": source, "tests": ["tests/x.py"], "seconds": 1,
                   "source_hash": digest, "total": 10, "untested": 0, "killed": 9,
                   "survived": 1, "timeout": 0, "suspicious": 0,
                   "survivors": [[7, "bad_survived", survivor]]}, records)
  out = str(tmp_path / "mutation.md")
  m.report(m.load_records(records), out)
  rows = [l for l in open(out).read().splitlines() if l.startswith("| `")]
  assert rows == [
      "| `tfadv/loss_scaling.py` | 10 | 9 | 0 | 1 (1) | 90.0% | 100.0% |",
      "| `tfadv/removed.py` † | 10 | 9 | 0 | 1 (0) | 90.0% | 90.0% |",
      "| `tfadv/tools/runs.py` † | 10 | 9 | 0 | 1 (0) | 90.0% | 90.0% |"]
  assert "- mutant 7 (bad_survived): not explained" in open(out).read()
  # mutmut's "suspicious" is a kill that took long: counted killed, not listed.
  m.save_record({"key": "x", "source": "tfadv/checks.py", "tests": ["tests/x.py"],
                 "seconds": 1, "source_hash": m.blob_hash("tfadv/checks.py"), "total": 4,
                 "untested": 0, "killed": 2, "survived": 1, "timeout": 0, "suspicious": 1,
                 "survivors": [[3, "ok_suspicious", "@@ -1 +1 @@\n-a = 1\n+a = 2\n"],
                               [4, "bad_survived", "@@ -1 +1 @@\n-b = 1\n+b = 2\n"]]}, records)
  m.report(m.load_records(records), out)
  text = open(out).read()
  assert "| `tfadv/checks.py` | 4 | 3 | 0 | 1 (0) | 75.0% | 75.0% |" in text
  assert "mutant 3" not in text and "- mutant 4 (bad_survived): not explained" in text
  # A line that only sizes files explains any survivor of it; another does not.
  sizing = "@@ -1 +1 @@\n-    first = chunk(0, min(n, 64))\n+    first = chunk(0, min(n, 65))\n"
  assert "performance only" in m._why("tfadv/data/records.py", sizing)  # pylint: disable=protected-access
  assert m._why("tfadv/data/sources.py", sizing) is None  # pylint: disable=protected-access


def test_a_mutation_scratch_copy_is_the_repository_and_the_runs_state_only(tmp_path):
  """What a mutant wrote into the scratch copy (a store named after a mutated
  URL, a stray file among the tests) is gone at the next run; the repository's
  files are fresh copies and mutmut's cache and the line map stay."""
  m = _mutation_tool()
  work = tmp_path / "work"
  (work / "ram:" / "tfadv-test").mkdir(parents=True)
  (work / "ram:" / "tfadv-test" / "metadata.json").write_text("{}")
  (work / "tests").mkdir()
  (work / "tests" / "stray.txt").write_text("x")
  (work / "tfadv").mkdir()
  (work / "tfadv" / "trainer.py").write_text("# a mutant left behind\n")
  (work / ".mutmut-cache").write_text("cache")
  (work / ".mutation-lines.json").write_text("{}")
  m.scratch_copy(str(work))
  assert not (work / "ram:").exists() and not (work / "tests" / "stray.txt").exists()
  assert (work / ".mutmut-cache").read_text() == "cache"
  assert (work / ".mutation-lines.json").read_text() == "{}"
  with open(os.path.join(REPO, "tfadv", "trainer.py")) as f:
    assert (work / "tfadv" / "trainer.py").read_text() == f.read()
  assert (work / "tests" / "mutation.py").exists() and not (work / "docs").exists()


def test_the_mutants_mutmut_has_not_run_are_found_in_its_cache(tmp_path):
  """mutmut 2 skips a mutant of the second of two identical lines (it reads
  the first one's status); the runner finds those left "untested" in the cache
  to run them one by one."""
  import sqlite3  # pylint: disable=g-import-not-at-top
  m = _mutation_tool()
  db = sqlite3.connect(str(tmp_path / ".mutmut-cache"))
  db.execute("CREATE TABLE Line (id INTEGER, line_number INTEGER)")
  db.execute('CREATE TABLE Mutant (id INTEGER, status TEXT, line INTEGER, "index" INTEGER)')
  db.executemany("INSERT INTO Line VALUES (?, ?)", [(1, 10), (2, 20)])
  db.executemany("INSERT INTO Mutant VALUES (?, ?, ?, ?)", [
      (5, "ok_killed", 1, 0), (6, "untested", 2, 0), (4, "untested", 2, 1),
      (7, "bad_survived", 1, 1)])
  db.commit()
  assert m._not_run(str(tmp_path)) == [4, 6]  # pylint: disable=protected-access


def test_the_committed_mutation_report_covers_the_package_and_is_its_records(tmp_path):
  """docs/mutation.md is the report of docs/mutation_runs.json as committed,
  and the records hold every file under tfadv/methods/ and tfadv/attacks/, the
  record store, its readers and pipeline, the selection, the trainer, the
  perturbation helpers and the loss scaling: each with no survivor left
  unexplained and a kill rate of at least 90%."""
  m = _mutation_tool()
  records = m.load_records(os.path.join(REPO, "docs", "mutation_runs.json"))
  out = str(tmp_path / "mutation.md")
  m.report(records, out)
  with open(os.path.join(REPO, "docs", "mutation.md")) as f:
    assert open(out).read() == f.read()
  wanted = {f"tfadv/{package}/{name}" for package in ("methods", "attacks")
            for name in os.listdir(os.path.join(REPO, "tfadv", package))
            if name.endswith(".py") and name != "__init__.py"}
  wanted |= {"tfadv/data/records.py", "tfadv/data/sources.py", "tfadv/data/pipeline.py",
             "tfadv/tools/runs.py", "tfadv/trainer.py", "tfadv/perturbation.py",
             "tfadv/loss_scaling.py"}
  assert wanted <= set(records), sorted(wanted - set(records))
  for source in wanted:
    r = records[source]
    assert r["killed"] + r["timeout"] + r["suspicious"] >= 0.9 * r["total"], source
    assert all(m._is_equivalent(source, diff)  # pylint: disable=protected-access
               for _, status, diff in r["survivors"] if status == "bad_survived"), source


def test_a_mutant_runs_first_the_tests_of_its_line_fastest_first_and_only_in_scope(tmp_path):
  """The mutmut hook tests/mutation.py writes: a mutated line's tests from the
  line map (quoted, fastest first); a line the map does not know runs the
  file's tests (the runner, unchanged); outside a scope, no run at all."""
  import types  # pylint: disable=g-import-not-at-top
  m = _mutation_tool()
  (tmp_path / ".mutation-lines.json").write_text(json.dumps({
      "lines": {"3": ["t.py::slow", "t.py::fast[a b]"], "4": []},
      "seconds": {"t.py::slow": 9.0, "t.py::fast[a b]": 0.5}}))
  namespace = {}
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    exec(m._MUTMUT_CONFIG.format(run="py run", pytest="--", scope=[3, 4], equivalent=["2:1"]),
         namespace)  # pylint: disable=exec-used,protected-access
  finally:
    os.chdir(cwd)

  def hook(line, index=0):  # mutmut counts lines from 0
    context = types.SimpleNamespace(
        current_line_index=line - 1, skip=False,
        mutation_id=types.SimpleNamespace(line_number=line - 1, index=index),
        config=types.SimpleNamespace(test_command="RUNNER"))
    namespace["pre_mutation"](context)
    return context.skip, context.config.test_command

  # Ended after 60 s + 10x the tests' 9.5 s in the map.
  assert hook(3) == (False, "py run --limit=155 --mutant=2:0 -- 't.py::fast[a b]' t.py::slow")
  assert hook(4) == (False, "RUNNER")
  assert hook(5) == (True, "RUNNER")
  assert hook(3, index=1) == (True, "RUNNER")  # explained equivalent: not rerun
  # A mutant the fork server ended at its limit is reported as timed out.
  (tmp_path / ".mutation-timeouts").write_text("2:0\n")
  rows = [(1, "ok_killed", 2, 0), (2, "ok_killed", 2, 1), (3, "bad_survived", 5, 0)]
  assert m.verdicts(rows, str(tmp_path)) == [
      (1, "bad_timeout", 2), (2, "ok_killed", 2), (3, "bad_survived", 5)]
  # An explained survivor the hook skipped keeps its verdict; another skip stays one.
  (tmp_path / ".mutation-equivalent.json").write_text(json.dumps(["6:0"]))
  assert m.verdicts([(4, "skipped", 6, 0), (5, "skipped", 6, 1)], str(tmp_path)) == [
      (4, "bad_survived", 6), (5, "skipped", 6)]


@pytest.mark.slow
def test_the_mutation_fork_server_answers_each_runs_exit_status_and_ends_a_hung_one(tmp_path):
  """tests/mutation_server.py: pytest's own status for a passing and a failing
  test, and a run whose client is killed (mutmut's timeout) is ended with it."""
  server_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mutation_server.py")
  (tmp_path / "test_x.py").write_text(
      "import time\ndef test_pass():\n  pass\ndef test_fail():\n  assert False\n"
      "def test_hang():\n  open('started', 'w').close()\n  time.sleep(600)\n")
  (tmp_path / "test_broken.py").write_text("x = {*{}, 'a': 1}\n")  # a mutant that does not parse
  sock = str(tmp_path / "s.sock")
  server = subprocess.Popen([sys.executable, server_py, "serve", sock, str(tmp_path / "log")],
                            cwd=tmp_path)
  try:
    client = lambda test: [sys.executable, server_py, "run", sock, "--", "-q", "-p",
                           "no:cacheprovider", f"test_x.py::{test}"]
    assert subprocess.run(client("test_pass"), cwd=tmp_path, timeout=120).returncode == 0
    assert subprocess.run(client("test_fail"), cwd=tmp_path, timeout=120).returncode == 1
    broken = client("test_pass")[:-1] + ["test_broken.py"]
    assert subprocess.run(broken, cwd=tmp_path, timeout=120).returncode == 1  # killed
    (tmp_path / "conftest.py").write_text("import broken_module_of_the_mutant\n")
    assert subprocess.run(client("test_pass"), cwd=tmp_path, timeout=120).returncode == 1
    (tmp_path / "conftest.py").unlink()
    hung = subprocess.Popen(client("test_hang"), cwd=tmp_path)
    for _ in range(300):
      if (tmp_path / "started").exists():
        break
      time.sleep(0.1)
    hung.kill()
    hung.wait()
    # The server is free again: the hung child is gone.
    assert subprocess.run(client("test_pass"), cwd=tmp_path, timeout=60).returncode == 0
    # With a limit the server ends it: killed for mutmut, noted as timed out.
    limited = client("test_hang")
    limited[4:4] = ["--limit=2", "--mutant=7:1"]
    assert subprocess.run(limited, cwd=tmp_path, timeout=60).returncode == 1
    assert (tmp_path / ".mutation-timeouts").read_text() == "7:1\n"
  finally:
    server.kill()
    server.wait()


def test_a_record_store_file_is_sorted_with_a_one_space_indent(tmp_path):
  """The committed records are diff-friendly: keys sorted, one space indent."""
  store = runs.RecordStore(str(tmp_path / "r.json"))
  store.put("b", ["x = 1"], {"accuracy": 0.5, "step": 2})
  store.put("a", [], {"step": 1, "accuracy": 0.25})
  want = {"a": {"accuracy": 0.25, "params": [], "step": 1},
          "b": {"accuracy": 0.5, "params": ["x = 1"], "step": 2}}
  assert (tmp_path / "r.json").read_text() == json.dumps(want, indent=1, sort_keys=True)


@pytest.mark.parametrize("jobs,cores,pinned", [(1, {2, 5, 7}, False), (2, {2, 5, 7}, True),
                                               (3, {2, 5, 7}, True), (4, {2, 5, 7}, False)])
def test_run_pinned_gives_each_of_its_jobs_a_core_of_its_own(monkeypatch, jobs, cores, pinned):
  """With more than one job and a core for each, each job runs on one of this
  process's cores (`sched_getaffinity(0)`), never one another job holds; with
  one job or too few cores nothing is pinned. Results keep the items' order."""
  monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid: {0: cores}[pid])
  held, clash, lock = set(), [], threading.Lock()

  def work(item, cpus):
    if cpus is not None:
      with lock:
        clash.extend(cpus) if held & set(cpus) else held.update(cpus)
      time.sleep(0.05)
      with lock:
        held.difference_update(cpus)
    return item, cpus

  out = runs.run_pinned(work, list(range(8)), jobs)
  assert [item for item, _ in out] == list(range(8)) and not clash
  if pinned:
    assert all(len(cpus) == 1 and cpus[0] in sorted(cores)[:jobs] for _, cpus in out)
  else:
    assert all(cpus is None for _, cpus in out)


def test_a_choice_ties_strictly_within_the_band_and_equal_rows_are_inside_the_spread():
  # Exactly `tie` below the best is not a tie (exact binary fractions).
  assert runs.choose_best({0.1: [0.25], 0.3: [0.5]}, tie=0.25) == 0.3
  assert runs.choose_best({0.1: [0.3125], 0.3: [0.5]}, tie=0.25) == 0.1
  assert runs.versus([1.0, 1.0], [1.0, 1.0]) == (0.0, 0.0, "inside the spread")
  assert runs.versus([2.0, 2.0], [1.0, 1.0]) == (1.0, 0.0, "better")
  assert runs.versus([1.0, 1.0], [2.0, 2.0]) == (-1.0, 0.0, "worse")


def test_a_section_needs_both_of_its_markers():
  for content in ("<!-- s -->\nx\n", "x\n<!-- /s -->\n", ""):
    with pytest.raises(ValueError, match="has no section 's'"):
      runs.read_section_text(content, "s")
  assert runs.read_section_text("a\n<!-- s -->\nx\n<!-- /s -->\nb", "s") == "\nx\n"


def test_a_mutation_scope_is_the_lines_of_the_functions_it_names(tmp_path):
  m = _mutation_tool()
  path = tmp_path / "f.py"
  path.write_text("def a():\n  return 1\n\n\nclass C:\n  def evaluate(self):\n"
                  "    x = 1\n    return x\n\n  def train(self):\n    pass\n")
  assert m.scope_lines(str(path), ("a", "evaluate")) == {1, 2, 6, 7, 8}
