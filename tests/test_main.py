"""Command line, gin errors, strategy factory, evaluate/export modes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import builders
from tfadv import distribute
from tfadv.main import ConfigError


def test_unknown_parameter_names_the_binding():
  with pytest.raises(ConfigError) as info:
    builders.configure(["Experiment.trian_steps = 5"])
  assert "Experiment.trian_steps = 5" in str(info.value)
  assert "trian_steps" in str(info.value)


def test_unknown_configurable_names_the_binding():
  with pytest.raises(ConfigError, match="Experimnt"):
    builders.configure(["Experimnt.train_steps = 5"])


def test_gin_file_typo_names_file_and_binding(tmp_path):
  path = tmp_path / "bad.gin"
  path.write_text("include 'configs/base/train.gin'\nadamw.learnig_rate = 1e-3\n")
  with pytest.raises(ConfigError) as info:
    gin_path = str(path)
    os.chdir(builders.REPO)
    builders.parse_config([gin_path], [])
  assert "bad.gin" in str(info.value) and "learnig_rate" in str(info.value)


def test_command_line_config_error_exits_2_with_message():
  proc = subprocess.run(
      [sys.executable, "-m", "tfadv.main", "--gin_file=configs/demo.gin",
       "--gin_param=Experiment.trian_steps = 5", "--model_dir=/tmp/unused"],
      cwd=builders.REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config error" in proc.stderr and "Experiment.trian_steps" in proc.stderr


def test_an_eval_tag_that_cannot_name_a_file_is_refused_in_one_line():
  from tfadv.errors import SettingError  # pylint: disable=g-import-not-at-top
  from tfadv.experiment import Experiment, eval_record_path  # pylint: disable=g-import-not-at-top
  for bad in ("../dev", "a b", "_x", "a/b"):
    with pytest.raises(SettingError, match="Experiment.eval_tag"):
      Experiment(task=None, eval_tag=bad)
  assert eval_record_path("m", "dev", "sub-2.v1") == os.path.join("m", "eval_results_dev_sub-2.v1.json")
  assert eval_record_path("m", "dev") == os.path.join("m", "eval_results_dev.json")


def test_strategy_factory():
  assert distribute.make_strategy("default") is tf.distribute.get_strategy()
  mirrored = distribute.make_strategy("mirrored", num_cpu_devices=2)
  assert mirrored.num_replicas_in_sync == 2
  with pytest.raises(ValueError, match="TF_CONFIG"):
    os.environ.pop("TF_CONFIG", None)
    distribute.make_strategy("multi_worker")
  with pytest.raises(ValueError, match="--tpu"):
    distribute.make_strategy("tpu")
  with pytest.raises(ValueError, match="expected one of"):
    distribute.make_strategy("gpu")
  with pytest.raises(RuntimeError, match="already initialised"):
    distribute.split_cpu(3)


def _table_refusal(model_dir):
  """What a table asking for dev says when only another split's record exists."""
  from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
  run = runs.Run(model_dir.name, "unused.gin", [], str(model_dir.parent))
  (model_dir / "wall_seconds.txt").write_text("1.0\n")
  assert run.result("dev")["split"] == "dev"  # the training record
  saved = (model_dir / "eval_results_dev.json").read_text()
  (model_dir / "eval_results_dev.json").unlink()
  (model_dir / "eval_results.json").write_text((model_dir / "eval_results_test.json").read_text())
  try:
    run.result("dev")
  except RuntimeError as e:
    return str(e)
  finally:
    (model_dir / "eval_results_dev.json").write_text(saved)
  return ""


@pytest.mark.slow
def test_evaluate_any_file_and_export_loads_without_tfadv(fewclue_dir, tmp_path):
  strategy = tf.distribute.get_strategy()
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=10, checkpoint_every=10)
  trained = builders.run("train_and_evaluate", tmp_path, strategy, bindings)
  training_record = (tmp_path / "eval_results.json").read_text()
  assert json.loads(training_record)["split"] == "dev"
  assert (tmp_path / "eval_results_dev.json").read_text() == training_record
  # A 3-record CLUE file elsewhere, in the `label_des` spelling.
  records = [{"label": "101", "label_des": "news_culture", "sentence": "一本书的文化史"},
             {"label": "103", "label_des": "news_sports", "sentence": "球队赢得冠军"},
             {"label": "104", "label_des": "news_finance", "sentence": "股市今日上涨"}]
  test_file = tmp_path / "test.json"
  test_file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), "utf-8")
  evaluated = builders.run("evaluate", tmp_path, strategy,
                          bindings + [f"ClueDataset.eval_file = '{test_file}'"])
  assert any("3 examples" in line for line in evaluated["lines"])
  model = evaluated["experiment"].model
  arrays = evaluated["experiment"].task.arrays("eval")
  logits = model({k: arrays[k] for k in ("token_ids", "segment_ids", "padding_mask")})
  expected_acc = float(np.mean(np.argmax(logits, -1) == arrays["label"]))
  assert evaluated["eval"]["accuracy"] == pytest.approx(expected_acc)
  # The other file's result is recorded under its own name; the run's
  # training record (what the tables read) is untouched.
  assert (tmp_path / "eval_results.json").read_text() == training_record
  other = json.loads((tmp_path / "eval_results_test.json").read_text())
  assert other["split"] == "test"
  assert other["accuracy"] == pytest.approx(expected_acc)
  assert "split 'test', not 'dev'" in _table_refusal(tmp_path)

  exported = builders.run("export", tmp_path, strategy, bindings)
  path = exported["export"]
  assert path.endswith("model.keras") and os.path.exists(path)
  code = ("import sys, json, keras, keras_hub, numpy as np\n"
          f"m = keras.saving.load_model({path!r})\n"
          f"texts = {[r['sentence'] for r in records]!r}\n"
          "print(json.dumps(np.asarray(m.predict(texts, verbose=0)).tolist()))\n"
          "assert not any(k.startswith('tfadv') for k in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=180, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  served = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
  np.testing.assert_allclose(served, np.asarray(logits), rtol=1e-4, atol=1e-5)
  del trained


@pytest.mark.parametrize("task", ["tnews", "iflytek"])
def test_each_clue_config_runs_the_epsilon_its_header_reports(task):
  """Every CLUE config parses, says its command and expected result, and binds
  the ε chosen on validation for the result it quotes, with the step size the
  table ran at that ε. The controls table (pre-registered grids) supersedes the
  validated table for each method as soon as it has chosen that method's ε on
  the task, and the cross-validated choice (same grids) supersedes both;
  Free's config follows the row of the carry it binds."""
  import glob  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from tfadv import main as main_lib  # pylint: disable=g-import-not-at-top
  from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
  # The tables' own records of their choices (methods_table wrote them).
  def of_task(path, section):
    try:
      recorded = runs.chosen_epsilons(path, section)
    except ValueError:  # no choice written yet
      return {}
    return {method: epsilon for (t, method), epsilon in recorded.items() if t == task}
  validated = of_task("docs/history.md", "text-methods-table-validated")
  controls = of_task("docs/results/text-controls-table.md", "text-controls-table")
  cross_validated = {**of_task("docs/results/text-cv-selection.md", "text-cv-selection"),
                     **of_task("docs/results/text-cv-selection-iflytek.md",
                               "text-cv-selection-iflytek")}
  assert len(validated) == 7
  files = sorted(glob.glob(f"configs/{task}_*.gin"))
  assert len(files) == 11  # the validated table's 8, R3F, character AT and FGM + it
  for path in files:
    method = path[len(f"configs/{task}_"):-len(".gin")]
    with open(path) as f:
      header = f.read().split("include")[0]
    assert f"# Run: python -m tfadv.main --gin_file={path}" in header, path
    assert "# Expected: " in header, path
    gin.clear_config()
    main_lib.parse_config([path], [])
    if method == "plain":
      continue
    if method.startswith("char_at"):  # the robustness table's rows (its quotes: test_readme.py)
      assert "text-robustness-table" in header and "not measured yet" not in header, path
      assert gin.query_parameter("CharSubstitutionTraining.attacked_share") == 0.5, path
      if method == "char_at_fgm":  # the inner FGM at the ε the FGM config binds
        gin.clear_config()
        main_lib.parse_config([f"configs/{task}_fgm.gin"], [])
        fgm_epsilon = gin.query_parameter("EmbeddingFGM.epsilon")
        gin.clear_config()
        main_lib.parse_config([path], [])
        assert gin.query_parameter("EmbeddingFGM.epsilon") == fgm_epsilon, path
      continue
    row = method
    if method == "free_output":
      carry = gin.query_parameter("EmbeddingOutputFree.carry")
      assert f"carry '{carry}'" in header, path  # the carry its result was measured with
      row = f"free_{carry}"
    if row in cross_validated:
      epsilon, table = cross_validated[row], "cross-validation"
    elif row in controls:
      epsilon, table = controls[row], "controls table"
    elif method in validated:
      epsilon, table = validated[method], "validated table"
    else:  # R3F before the controls table chose its λ: fairseq's defaults
      assert gin.query_parameter("R3F.r3f_lambda") == 1.0, path
      assert gin.query_parameter("R3F.epsilon") == 1e-5, path
      assert "not measured yet" in header, path
      continue
    assert table in header, (path, table)
    assert gin.query_parameter(runs.EPSILON_BINDING[method]) == epsilon, path
    if method in runs.STEP_BINDING:
      step, ratio = runs.STEP_BINDING[method]
      assert gin.query_parameter(step) == pytest.approx(ratio * epsilon), path
  gin.clear_config()
