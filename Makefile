# Two commands do all the set-up: `make demo` and `make test` create .venv
# from pyproject.toml on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m tfadv.main --gin_file=configs/demo.gin --model_dir=runs/demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
