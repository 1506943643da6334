"""Result-table plumbing: doc sections and cached runs."""

import json

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
