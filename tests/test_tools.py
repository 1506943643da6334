"""Result-table plumbing: doc sections and cached runs."""

import json
import shutil
import subprocess
import sys

import pytest
from absl import app

from tfadv.tools import runs


def test_replace_section_keeps_the_other_sections(tmp_path):
  path = str(tmp_path / "results.md")
  runs.replace_section(path, "text", "## Text\nold")
  runs.replace_section(path, "vision", "## Vision\nrows")
  runs.replace_section(path, "text", "## Text\nnew")
  content = open(path).read()
  assert content.startswith("# Results\n")
  assert "old" not in content and content.index("new") < content.index("rows")
  assert content.count("<!-- text -->") == 1 and content.count("<!-- /vision -->") == 1


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


def _finished_run(work_dir, name, validation, dev, step=300):
  path = work_dir / name
  path.mkdir()
  (path / "eval_results_dev.json").write_text(json.dumps({
      "accuracy": dev, "loss": 2.0, "step": step, "split": "dev",
      "best": {"step": step, "metrics": {"accuracy": validation, "loss": 2.0}}}))
  (path / "wall_seconds.txt").write_text("10.0\n")


def test_methods_table_chooses_on_validation_and_lists_each_run_once(tmp_path):
  """ε by mean validation accuracy even where dev disagrees; each run in one list."""
  work, out, data = tmp_path / "runs", tmp_path / "docs", tmp_path / "data"
  work.mkdir()
  (data / "tnews").mkdir(parents=True)
  for seed, dev in enumerate((0.30, 0.32)):
    _finished_run(work, f"tnews_plain_seed{seed}", 0.40, dev)
    # ε = 0.3 wins on validation (0.45 vs 0.41) while ε = 1 is better on dev.
    _finished_run(work, f"tnews_fgm_eps0.3_seed{seed}", 0.45, 0.33)
    _finished_run(work, f"tnews_fgm_eps1_seed{seed}", 0.41, 0.40)
  # Its own process, as users run it (its flags would clash with tfadv.main's here);
  # every run is read back, none trains.
  argv = [sys.executable, "-m", "tfadv.tools.methods_table", f"--work_dir={work}", f"--out_dir={out}", f"--data_dir={data}",
          "--tasks=tnews", "--methods=plain,fgm", "--seeds=0,1", "--select=fgm:0.3,1",
          "--section=t"]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tnews fgm: ε = 0.3 chosen on validation." in proc.stdout
  text = (out / "results.md").read_text()
  assert "| plain | 31.00 ± 1.41 (n=2) |" in text
  assert "| fgm | 33.00 ± 0.00 (n=2) [+2.00] |" in text  # ε = 0.3's dev, not ε = 1's
  assert "| tnews | fgm | 0.3 | 0.3: 45.00, 1: 41.00 |" in text
  assert runs.chosen_epsilons(str(out / "results.md"), "t") == {("tnews", "fgm"): 0.3}
  assert text.count("| tnews | fgm ε=0.3 (chosen) |") == 2
  assert text.count("| tnews | fgm ε=1 |") == 2
  assert text.count("| tnews | plain |") == 2  # the other runs, once each
  assert "| tnews | fgm | 0 |" not in text
  assert (out / "results_t.png").exists()
  # --report starts nothing: a method with a candidate still to run gets no row.
  shutil.rmtree(work / "tnews_fgm_eps1_seed1")
  proc = subprocess.run(argv + ["--report"], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not (work / "tnews_fgm_eps1_seed1").exists()
  text = (out / "results.md").read_text()
  assert "| plain | 31.00 ± 1.41 (n=2) |" in text and "| fgm |" not in text
  assert "Not run yet (1 runs" in text and "TNEWS fgm (1)." in text
  assert text.count("| tnews | fgm ε=0.3 |") == 2  # listed, not chosen
