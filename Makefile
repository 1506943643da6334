# Two commands do all the set-up: `make demo` and `make test` create .venv
# from pyproject.toml on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test test-fast test-lowest benchmark clean pretrain mutation

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m tfadv.tools.demo --work_dir=runs/demo

# The preset every CLUE config fine-tunes from (about 35 minutes on 2 cores).
PRESET := runs/pretrain_mlm_zh/preset
pretrain: $(PRESET)/config.json
$(PRESET)/config.json: | install
	$(PY) -m tfadv.main --gin_file=configs/pretrain_mlm_zh.gin --model_dir=runs/pretrain_mlm_zh

# Two pytest workers, one per core (about 13 min for 665 tests on 2 idle cores);
# each worker has its own two logical CPU devices.
test: install
	$(PY) -m pytest -q -n 2 tests

# The unit tests against the lowest declared versions (TensorFlow 2.16.1, the
# TPU launcher's default runtime; launch/constraints-tf2.16.txt), in their own venv.
LOWEST ?= .venv-lowest
$(LOWEST)/.installed: pyproject.toml launch/constraints-tf2.16.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c launch/constraints-tf2.16.txt -e '.[test,plot]'
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -c "import tensorflow as tf, keras, keras_hub; print('TF', tf.__version__, 'keras', keras.__version__, 'keras-hub', keras_hub.__version__)"
	$(LOWEST)/bin/python -m pytest -q -m "not slow" tests

# Unit tests only (no training runs, subprocesses or multi-worker), one worker a core:
# about 1.8 min on 2 idle cores (541 tests).
test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# Mutation testing of every file in tests/mutation.py's TARGETS, each with the
# tests that cover it: records in docs/mutation_runs.json, report in
# docs/mutation.md. Many CPU hours on 2 cores; it resumes where it stopped
# (tests/mutation.py --files=KEY,... for some).
mutation: install
	$(PY) -m pip install -q 'mutmut==2.5.1' 'coverage>=7'
	$(PY) tests/mutation.py

clean:
	rm -rf runs .pytest_cache
