"""docs/results/: each table's page is what its tool writes from the committed
records and its spec file, and each spec yields its recorded runs."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tfadv.tools import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(glob.glob(os.path.join(REPO, "configs", "tables", "*.flags")))
# Tables pre-registered and still running (across sessions): their pages list
# the runs still to come. A table leaves this set when its last run is in.
IN_PROGRESS = set()


def _spec_flags(spec):
  """{flag: value} of a spec file (one --flag=value a line, # comments)."""
  found = {}
  for line in open(spec):
    line = line.strip()
    if line.startswith("--"):
      key, _, value = line[2:].partition("=")
      found.setdefault(key, value)
  return found


def test_every_table_in_docs_results_has_a_spec_and_every_spec_a_page():
  sections = {_spec_flags(spec).get("section") or {
      "vision_robustness.flags": "vision-robustness-table",
      "vision_selection.flags": "vision-validation-selection"}[os.path.basename(spec)]
              for spec in SPECS}
  pages = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "docs", "results",
                                                                    "*.md"))}
  generated = {p for p in pages if "<!-- " + p + " -->" in open(
      os.path.join(REPO, "docs", "results", p + ".md")).read()}
  assert sections == generated, (sections, generated)
  index = open(os.path.join(REPO, "docs", "results", "README.md")).read()
  for page in pages - {"README"}:
    assert f"]({page}.md)" in index, f"docs/results/README.md does not link {page}.md"


@pytest.mark.parametrize("spec", [os.path.basename(s) for s in SPECS])
def test_a_page_regenerated_from_its_records_has_no_diff(spec, tmp_path, request):
  flags = _spec_flags(os.path.join(REPO, "configs", "tables", spec))
  vision = spec.startswith("vision_")
  section = flags.get("section") or ("vision-validation-selection" if "validation_fraction"
                                     in flags else "vision-robustness-table")
  committed = os.path.join(REPO, "docs", "results", f"{section}.md")
  shutil.copy(committed, tmp_path / f"{section}.md")  # the text outside the markers
  for png in glob.glob(os.path.join(REPO, "docs", "results", "*.png")):
    shutil.copy(png, tmp_path)
  extra = [] if vision else [f"--data_dir={request.getfixturevalue('fewclue_dir')}"]
  records = os.path.join(REPO, flags["records"]) if "records" in flags else None
  before = open(records, "rb").read() if records and os.path.exists(records) else None
  tool = "robustness_table" if vision else "methods_table"
  proc = subprocess.run(
      [sys.executable, "-m", f"tfadv.tools.{tool}", f"--flagfile=configs/tables/{spec}",
       "--report", f"--out_dir={tmp_path}", *extra],
      capture_output=True, text=True, check=False, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  if before is not None:  # a report reads the committed records, never rewrites them
    assert open(records, "rb").read() == before, f"--report rewrote {flags['records']}"
  again = (tmp_path / f"{section}.md").read_text()
  assert again == open(committed).read(), (
      f"docs/results/{section}.md differs from what `python -m tfadv.tools.{tool} "
      f"--flagfile=configs/tables/{spec} --report` writes from the records: rerun it")
  # Every training run the spec plans is in the records, or the table says
  # it is still running.
  generated = runs.read_section_text(again, section)
  complete = "Not run yet" not in generated and "not yet run" not in generated
  assert complete == (spec not in IN_PROGRESS), (
      f"{spec}: " + ("runs missing from the records" if not complete
                     else "complete: remove it from IN_PROGRESS"))
