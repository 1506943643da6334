"""pytest plugin for tests/mutation.py: which tests execute each line of one file.

    TFADV_MUTATION_SOURCE=tfadv/methods/fgm.py TFADV_MUTATION_LINES=out.json \\
        python -m pytest -p mutation_coverage tests/test_nlp_methods.py

writes {"lines": {line: [test ids]}, "seconds": {test id: s}}: per line of the
source (1-based) the node ids of the tests that ran it, in the order they ran.
Functions run eagerly here (`tf.config.run_functions_eagerly`): under
`tf.function`, AutoGraph executes a converted copy of the code from a temporary
file, which coverage would not attribute to the source. The map only narrows
the tests a mutant runs first; a mutant that survives them is run against all
of its file's tests (mutmut's --rerun-all), so a line the map misses costs
time, not a result.
"""

import json
import os

import coverage

_STATE = {}


def pytest_configure(config):
  del config
  source = os.path.abspath(os.environ["TFADV_MUTATION_SOURCE"])
  cov = coverage.Coverage(data_file=None, include=[source], branch=False)
  cov.start()
  _STATE.update(cov=cov, source=source, order=[], seconds={})
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.run_functions_eagerly(True)


def pytest_runtest_setup(item):
  _STATE["cov"].switch_context(item.nodeid)
  if item.nodeid not in _STATE["order"]:
    _STATE["order"].append(item.nodeid)


def pytest_runtest_logreport(report):
  if "seconds" in _STATE:
    _STATE["seconds"][report.nodeid] = (_STATE["seconds"].get(report.nodeid, 0.0)
                                        + report.duration)


def pytest_unconfigure(config):
  del config
  cov = _STATE.get("cov")
  if cov is None:
    return
  cov.stop()
  data = cov.get_data()
  order = {nodeid: i for i, nodeid in enumerate(_STATE["order"])}
  lines = {}
  for line, contexts in (data.contexts_by_lineno(_STATE["source"]) or {}).items():
    tests = sorted((c for c in contexts if c in order), key=order.get)
    lines[str(line)] = tests
  with open(os.environ["TFADV_MUTATION_LINES"], "w") as f:
    json.dump({"lines": lines, "seconds": {k: round(v, 3) for k, v in
                                           _STATE["seconds"].items()}}, f, indent=0)
