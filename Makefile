# Two commands do all the set-up: `make run` and `make test`; each creates .venv when missing.
# `make lab` adds JupyterLab and jupytext and opens the notebooks with the project's kernel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/quick.yaml
SEEDS ?= 0
JOBS ?= 1

.PHONY: run test bench lab venv clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m bilateral run $(PARAMS) --seeds $(SEEDS) --jobs $(JOBS) --download

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m bilateral bench --quick

# The kernel goes into .venv (--sys-prefix), so the notebooks run this checkout's interpreter.
$(VENV)/.lab: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,notebook]'
	$(PY) -m ipykernel install --sys-prefix --name bilateral --display-name "Python (bilateral)"
	touch $@

lab: $(VENV)/.lab
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
