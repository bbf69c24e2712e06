# Two commands do all the set-up: `make run` and `make test`; each creates .venv when missing.
# `make lab` adds JupyterLab and jupytext and opens the notebooks with the project's kernel
# (`make test` sets it up too, for the browser test).
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

# the lab environment too: tests/test_lab.py drives JupyterLab in a headless Chromium
# Two workers, each test file on one of them (module fixtures are shared within a file); the
# SLURM tests share one session fixture, so a worker starts the cluster only when it is down.
test: $(VENV)/.lab
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(PY) -m bilateral bench --quick

# The kernel goes into .venv (--sys-prefix), so the notebooks run this checkout's interpreter; its
# BILATERAL_KERNEL tells a notebook it runs on it (bilateral/notebook.py). In a git checkout,
# nbstripout becomes the clean filter of *.ipynb (.gitattributes): outputs, execution counts and
# language_info are stripped at `git add`, so a notebook run and saved in JupyterLab commits as
# it was, and `git status` shows it unchanged.
NBSTRIPOUT := "$(abspath $(PY))" -m nbstripout --keep-id
$(VENV)/.lab: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,notebook]'
	$(PY) -m ipykernel install --sys-prefix --name bilateral --display-name "Python (bilateral)" \
		--env BILATERAL_KERNEL bilateral
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git config filter.nbstripout.clean '$(NBSTRIPOUT)' && \
		git config filter.nbstripout.smudge cat && \
		git config filter.nbstripout.required true && \
		git config filter.nbstripout.extrakeys metadata.language_info && \
		git config diff.ipynb.textconv '$(NBSTRIPOUT) -t'; fi
	touch $@

# JupyterLab at the repository root (outputs/ and results/ one click away), opening on notebooks/
lab: $(VENV)/.lab
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks

clean-venv:
	rm -rf $(VENV)
