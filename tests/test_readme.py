"""README's numbers are the committed run records' (no number typed by hand survives a rerun)."""

import json
import os
import re
import statistics

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README row -> the records' run name (before "_seed<k>") per task.
TEXT_ROWS = {
    "plain": {"tnews": "plain", "iflytek": "plain"},
    "matrix FGM, Su's form": {"tnews": "fgm_eps0.3", "iflytek": "fgm_eps1"},
    "its random control": None,  # the row above's control, resolved below
    "output FGM (ε 0.1)": {"tnews": "fgm_output_eps0.1", "iflytek": "fgm_output_eps0.1"},
    "Su's gradient penalty": {"tnews": "gp_eps0.3", "iflytek": "gp_eps1"},
    "R3F": {"tnews": "r3f_eps0.1", "iflytek": "r3f_eps1"},
    "output PGD-3 (ε 0.1)": {"tnews": "pgd_output_eps0.1", "iflytek": "pgd_output_eps0.1"},
    "FreeLB-3 (ε 0.1)": {"tnews": "freelb_eps0.1", "iflytek": "freelb_eps0.1"},
    "Free-3, `carry='reset'` (ε 0.1)": {"tnews": "free_reset_eps0.1",
                                        "iflytek": "free_reset_eps0.1"},
}
CONTROLS = {"matrix FGM, Su's form": {"tnews": "fgm_random_eps0.3", "iflytek": "fgm_random_eps1"},
            "output FGM (ε 0.1)": {"tnews": "fgm_output_random_eps0.1",
                                   "iflytek": "fgm_output_random_eps0.1"}}
VISION_ROWS = {"natural": "natural", "PGD-7": "pgd7", "Free-8": "free8",
               "Free-8, twice the epochs": "free8_2x",
               "Free-8, Shafahi et al.'s clamp": "free8_reference", "ATTA-1": "atta",
               "FGSM-RS": "fgsm"}


def _readme():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    return f.read()


def _records(name):
  with open(os.path.join(REPO, "docs", name), encoding="utf-8") as f:
    return json.load(f)


def _table(text, header_start):
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


def _percent(values):
  mean, std = statistics.fmean(values), statistics.stdev(values)
  return 100 * mean, 100 * std


def _number(cell):
  """(number, bold) of a cell's first number."""
  return float(re.search(r"\d+\.\d+", cell).group()), cell.startswith("**")


def test_readme_is_at_most_150_lines():
  assert len(_readme().splitlines()) <= 150


def test_text_table_is_the_controls_table_records():
  records = _records("text_controls_table_runs.json")
  rows = _table(_readme(), "| method | TNEWS | IFLYTEK |")
  assert [r[0] for r in rows] == ["plain", "matrix FGM, Su's form", "its random control",
                                  "output FGM (ε 0.1)", "its random control",
                                  "Su's gradient penalty", "R3F", "output PGD-3 (ε 0.1)",
                                  "FreeLB-3 (ε 0.1)", "Free-3, `carry='reset'` (ε 0.1)"]
  previous = None
  for row in rows:
    runs = TEXT_ROWS[row[0]] or CONTROLS[previous]
    previous = row[0] if TEXT_ROWS[row[0]] else previous
    for task, clean_cell in (("tnews", row[1]), ("iflytek", row[2])):
      names = [f"{task}_{runs[task]}_seed{s}" for s in range(3)]
      mean, std = _percent([records[n]["accuracy"] for n in names])
      plain_mean, plain_std = _percent([records[f"{task}_plain_seed{s}"]["accuracy"]
                                        for s in range(3)])
      got_mean, bold = _number(clean_cell)
      got_std = float(re.search(r"± (\d+\.\d+)", clean_cell).group(1))
      assert (got_mean, got_std) == (round(mean, 2), round(std, 2)), (row[0], task)
      assert bold == (row[0] != "plain" and mean - plain_mean > std + plain_std), (row[0], task)
      epsilon = re.search(r"\((?:ε|λ) ([\d.]+)\)", clean_cell)
      if epsilon:  # the chosen ε (λ) the cell names is the records'
        assert runs[task].endswith(f"_eps{epsilon.group(1)}"), (row[0], task)


ROBUSTNESS_ROWS = {"plain": "plain", "matrix FGM": "fgm", "character AT": "char_at",
                   "FGM + character AT": "char_at_fgm"}


def test_text_attack_table_is_the_robustness_table_records():
  """Clean: dev accuracy, mean ± std; under 1 / 2 characters: the tight (beam)
  search's accuracy on the attacked records, means; bold iff beyond plain by
  more than the summed standard deviations."""
  records = _records("text_robustness_table_runs.json")
  rows = _table(_readme(), "| method | TNEWS clean | TNEWS 1 / 2 chars |")
  assert [r[0] for r in rows] == list(ROBUSTNESS_ROWS)

  def stats(task, method, key, attacks):
    suffix = "/attacks" if attacks else ""
    return _percent([records[f"{task}_{method}_seed{s}{suffix}"][key] for s in range(3)])

  for row in rows:
    method = ROBUSTNESS_ROWS[row[0]]
    for task, clean_cell, attack_cell in (("tnews", row[1], row[2]), ("iflytek", row[3], row[4])):
      mean, std = stats(task, method, "accuracy", False)
      plain_mean, plain_std = stats(task, "plain", "accuracy", False)
      got, bold = _number(clean_cell)
      assert clean_cell.strip("*") == f"{mean:.2f} ± {std:.2f}", (row[0], task)
      assert bold == (method != "plain" and mean - plain_mean > std + plain_std), (row[0], task)
      for budget, cell in zip((1, 2), attack_cell.split(" / ")):
        key = f"accuracy_sub{budget}_beam"
        mean, std = stats(task, method, key, True)
        plain_mean, plain_std = stats(task, "plain", key, True)
        value, bold = _number(cell)
        assert value == round(mean, 2), (row[0], task, budget)
        assert bold == (method != "plain" and mean - plain_mean > std + plain_std), (
            row[0], task, budget)


def test_vision_table_and_its_reading_are_the_records():
  records = _records("vision_table_runs.json")
  rows = _table(_readme(), "| method | clean | robust")
  assert [r[0] for r in rows] == list(VISION_ROWS)
  by_row = {}
  for row in rows:
    runs = [records[f"{VISION_ROWS[row[0]]}_seed{s}"] for s in range(3)]
    by_row[row[0]] = runs
    for cell, key in zip(row[1:], ("accuracy", "accuracy_worst_case", "accuracy_pgd50x10")):
      if cell == "–":
        assert not all(key in r for r in runs), (row[0], key)
        continue
      mean, std = _percent([r[key] for r in runs])
      assert cell == f"{mean:.2f} ± {std:.2f}", (row[0], key)
  gap = (statistics.fmean(r["accuracy_worst_case"] for r in by_row["PGD-7"])
         - statistics.fmean(r["accuracy_worst_case"] for r in by_row["Free-8"]))
  time = (statistics.fmean(r["train_seconds"] for r in by_row["Free-8"])
          / statistics.fmean(r["train_seconds"] for r in by_row["PGD-7"]))
  assert (f"Free-8 comes within {100 * gap:.2f} points of PGD-7 at {time:.2f}× its "
          "training time") in _readme().replace("\n", " ")


def test_the_validation_split_size_readme_names(fewclue_dir):
  from tfadv.data.clue import ClueDataset  # pylint: disable=g-import-not-at-top
  tnews = ClueDataset(os.path.join(fewclue_dir, "tnews"), validation_fraction=0.15)
  size = len(tnews.examples("validation")[0])
  assert f"a {size}-example validation split" in _readme().replace("\n", " ")


@pytest.mark.parametrize("task", ["bustm", "eprstmt"])
@pytest.mark.parametrize("method", ["plain", "fgm", "fgm_output"])
def test_pair_config_headers_quote_their_records(task, method):
  records = _records("text_fewclue_pairs_runs.json")
  mean, std = _percent([records[f"{task}_{method}_seed{s}"]["accuracy"] for s in range(3)])
  with open(os.path.join(REPO, "configs", f"{task}_{method}.gin"), encoding="utf-8") as f:
    header = f.read().split("include")[0]
  assert f"dev accuracy {mean:.2f} ± {std:.2f}%" in header
  if method != "plain":
    plain, _ = _percent([records[f"{task}_plain_seed{s}"]["accuracy"] for s in range(3)])
    assert f"{abs(mean - plain):.2f}" in header


def test_readme_reads_the_pair_table_as_its_records_say():
  records = _records("text_fewclue_pairs_runs.json")

  def gap(task, method):
    mean = lambda m: _percent([records[f"{task}_{m}_seed{s}"]["accuracy"] for s in range(3)])
    return mean(method)[0] - mean("plain")[0]

  text = " ".join(_readme().split())
  assert (f"ties plain ({gap('bustm', 'fgm_output'):.2f}, {gap('eprstmt', 'fgm_output'):.2f} "
          "points" in text.replace("−", "-"))
  assert (f"loses {-gap('bustm', 'fgm'):.2f} and {-gap('eprstmt', 'fgm'):.2f}" in text)


def test_the_cross_validated_tnews_choice_is_read_and_bound_as_recorded():
  """README's sentence and the TNEWS FGM/GP configs' headers: the ε the
  cross-validation section chose, and its dev runs' mean ± std in the records."""
  from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
  chosen = runs.chosen_epsilons(os.path.join(REPO, "docs", "results", "text-cv-selection.md"),
                                "text-cv-selection")
  records = _records("text_controls_table_runs.json")
  plain, _ = _percent([records[f"tnews_plain_seed{s}"]["accuracy"] for s in range(3)])
  for method in ("fgm", "gp"):
    epsilon = chosen[("tnews", method)]
    mean, std = _percent([records[f"tnews_{method}_eps{epsilon:g}_seed{s}"]["accuracy"]
                          for s in range(3)])
    with open(os.path.join(REPO, "configs", f"tnews_{method}.gin"), encoding="utf-8") as f:
      header = " ".join(f.read().split("include")[0].replace("#", " ").split())
    assert f"dev accuracy {mean:.2f} ± {std:.2f}% ({mean - plain:+.2f} over plain" in header
    assert "5-fold cross-validation" in header
  epsilon = chosen[("tnews", "fgm")]
  mean, std = _percent([records[f"tnews_fgm_eps{epsilon:g}_seed{s}"]["accuracy"]
                        for s in range(3)])
  assert (f"matrix FGM takes ε {epsilon:g}: {mean:.2f} ± {std:.2f} on dev, "
          f"{mean - plain:+.2f} over plain") in " ".join(_readme().split())


def test_the_cross_validated_iflytek_choices_are_read_and_bound_as_recorded():
  """README's sentence on IFLYTEK's FGM, and the IFLYTEK FGM/GP configs: they
  bind the ε the cross-validation chose, and their headers say so."""
  from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
  page = os.path.join(REPO, "docs", "results", "text-cv-selection-iflytek.md")
  chosen = runs.chosen_epsilons(page, "text-cv-selection-iflytek")
  epsilon = chosen[("iflytek", "fgm")]
  records = _records("text_controls_table_runs.json")
  plain, _ = _percent([records[f"iflytek_plain_seed{s}"]["accuracy"] for s in range(3)])
  for method, binding in (("fgm", "EmbeddingFGM.epsilon"),
                          ("gp", "EmbeddingGradientPenalty.epsilon")):
    with open(os.path.join(REPO, "configs", f"iflytek_{method}.gin"), encoding="utf-8") as f:
      config = f.read()
    bound = float(re.search(rf"^{re.escape(binding)} = (\S+)$", config, re.M).group(1))
    assert bound == chosen[("iflytek", method)], (method, bound)
    assert "5-fold cross-validation" in _header(os.path.join(REPO, "configs",
                                                             f"iflytek_{method}.gin"))
  mean, std = _percent([records[f"iflytek_fgm_eps{epsilon:g}_seed{s}"]["accuracy"]
                        for s in range(3)])
  assert (f"on IFLYTEK ε {epsilon:g} ties 1 and the smaller wins: {mean:.2f} ± {std:.2f}, "
          f"{mean - plain:+.2f}, inside it") in " ".join(_readme().split())


def _chosen(task):
  """{method: ε} the configs follow on `task`: the controls table's choice,
  superseded by a cross-validated one (docs/results/)."""
  from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
  chosen = {}
  for page in ("text-controls-table", "text-cv-selection", "text-cv-selection-iflytek"):
    try:
      found = runs.chosen_epsilons(os.path.join(REPO, "docs", "results", f"{page}.md"), page)
    except ValueError:  # no choice written yet
      continue
    chosen.update({method: e for (t, method), e in found.items() if t == task})
  return chosen


def _header(path):
  with open(path, encoding="utf-8") as f:
    return " ".join(f.read().split("include")[0].replace("#", " ").split())


CLUE_CONFIGS = sorted(os.path.basename(p) for task in ("tnews", "iflytek") for p in
                      __import__("glob").glob(os.path.join(REPO, "configs", f"{task}_*.gin")))


@pytest.mark.parametrize("config", CLUE_CONFIGS)
def test_every_clue_config_header_quotes_its_records(config):
  """The result a TNEWS/IFLYTEK config's header quotes (dev mean ± std, the
  difference from plain, accuracy under 1 and 2 characters) is its row's in
  the records: the run at the ε its table chose; the matrix-form GP's in the
  superseded validated table it names (docs/history.md)."""
  task, method = config[:-len(".gin")].split("_", 1)
  header = _header(os.path.join(REPO, "configs", config))
  if "Expected: not measured yet" in header:  # pre-registered, not run: no number to quote
    assert not re.search(r"\d+\.\d\d ± ", header), config
    return
  if method.startswith("char_at"):  # measured by the robustness table
    _check_robustness_header(task, method, header)
    return
  if method.endswith("_matrix"):  # measured only by the validated table, now history
    from tfadv.tools import runs  # pylint: disable=g-import-not-at-top
    section = runs.read_section(os.path.join(REPO, "docs", "history.md"),
                                "text-methods-table-validated")
    row = _table(section, "| method | TNEWS")
    cell = dict((r[0], r[1:]) for r in row)[method][0 if task == "tnews" else 1]
    mean_std, diff = re.match(r"(\S+ ± \S+) \(n=3\) \[(\S+)\]", cell).groups()
    assert f"dev accuracy {mean_std}% ({diff} over plain)" in header and "docs/history.md" in header
    return
  records = _records("text_controls_table_runs.json")
  if method == "plain":
    run = "plain"
  else:
    row = method
    if method == "free_output":
      with open(os.path.join(REPO, "configs", config), encoding="utf-8") as f:
        carry = re.search(r"EmbeddingOutputFree\.carry = '(\w+)'", f.read())
      row = f"free_{carry.group(1) if carry else 'reset'}"
    run = f"{row}_eps{_chosen(task)[row]:g}"
  names = [f"{task}_{run}_seed{s}" for s in range(3)]
  mean, std = _percent([records[n]["accuracy"] for n in names])
  assert f"dev accuracy {mean:.2f} ± {std:.2f}%" in header, (config, mean, std)
  plain = [f"{task}_plain_seed{s}" for s in range(3)]
  plain_mean, _ = _percent([records[n]["accuracy"] for n in plain])
  if method != "plain":
    quoted = re.search(r"\(([+\-−]\d+\.\d\d) (?:over|from) plain", header)
    assert quoted and float(quoted.group(1).replace("−", "-")) == round(mean - plain_mean, 2), (
        config, mean - plain_mean)
  attacked = re.search(r"under a 1-character attack (\S+)% \(plain (\S+)%\), under 2 "
                       r"characters (\S+)% \(plain (\S+)%\)", header)
  if attacked:
    for budget, value, base in ((1, *attacked.groups()[:2]), (2, *attacked.groups()[2:])):
      key = f"accuracy_sub{budget}"
      assert float(value) == round(_percent([records[n + "/attacks"][key] for n in names])[0], 2)
      assert float(base) == round(_percent([records[n + "/attacks"][key] for n in plain])[0], 2)


def _check_robustness_header(task, method, header):
  """A character-AT config quotes its robustness-table row: dev accuracy, the
  difference from that table's plain runs, accuracy under the tight
  1-character attack on the attacked records and plain's there."""
  records = _records("text_robustness_table_runs.json")
  names = [f"{task}_{method}_seed{s}" for s in range(3)]
  plain = [f"{task}_plain_seed{s}" for s in range(3)]
  mean, std = _percent([records[n]["accuracy"] for n in names])
  plain_mean, plain_std = _percent([records[n]["accuracy"] for n in plain])
  assert f"dev accuracy {mean:.2f} ± {std:.2f}%" in header, (task, method, mean, std)
  quoted = re.search(r"\(([+\-−]\d+\.\d\d) from plain, (inside|beyond) the spread", header)
  assert quoted and float(quoted.group(1).replace("−", "-")) == round(mean - plain_mean, 2)
  assert quoted.group(2) == ("beyond" if abs(mean - plain_mean) > std + plain_std else "inside")
  tight = re.search(r"tight 1-character attack (\S+)% \(plain (\S+)%\) on the first 200", header)
  assert tight, (task, method)
  for value, runs in zip(tight.groups(), (names, plain)):
    attacked = _percent([records[n + "/attacks"]["accuracy_sub1_beam"] for n in runs])[0]
    assert float(value) == round(attacked, 2), (task, method, value)
  assert "docs/results/text-robustness-table.md" in header


@pytest.mark.parametrize("config,row", [("fashion_mnist_pgd7.gin", "pgd7"),
                                        ("fashion_mnist_free8.gin", "free8"),
                                        ("fashion_mnist_free4.gin", "free4"),
                                        ("fashion_mnist_atta.gin", "atta"),
                                        ("fashion_mnist_fgsm.gin", "fgsm"),
                                        ("fashion_mnist_plain.gin", "natural")])
def test_every_vision_config_header_quotes_its_records(config, row):
  records = _records("vision_table_runs.json")
  runs = [records[f"{row}_seed{s}"] for s in range(3)]
  header = _header(os.path.join(REPO, "configs", config))
  clean, clean_std = _percent([r["accuracy"] for r in runs])
  robust, robust_std = _percent([r["accuracy_worst_case"] for r in runs])
  assert (f"clean {clean:.2f} ± {clean_std:.2f}%, worst-case robust {robust:.2f} ± "
          f"{robust_std:.2f}%") in header, (config, clean, robust)
