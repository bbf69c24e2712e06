# Two commands do all the set-up: `make run` and `make test`; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/quick.yaml
SEEDS ?= 0
JOBS ?= 1

.PHONY: run test bench venv clean-venv

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

clean-venv:
	rm -rf $(VENV)
