# The README's two commands are `make reports` (the main job) and `make test` (all tests).
# Both install everything first, into .venv, from PyPI with the pins in constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= cpu
STAMP := $(VENV)/.so8lab-installed
JS := $(VENV)/js
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: install reports test export lab clean-reports benchmark docs notebooks

install: $(STAMP)

# torch and triton are installed first with their exact pins: torch==2.13.0 resolves to the local CPU wheel,
# while any looser requirement would pull several GB of CUDA packages.
$(STAMP): setup.py settings.ini constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 triton==3.7.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	# Offline HTML reports: require.js and the Jupyter widget manager as local copies (so8lab.export.export_html reads $(JS));
	# MathJax 3 (its self-contained tex-svg.js) draws the maths of the documentation site (so8lab.docs)
	command -v npm >/dev/null || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends nodejs npm; }
	npm install --prefix $(JS) --no-audit --no-fund --ignore-scripts --no-package-lock @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8 mathjax@3.2.2
	# Browser tests: Debian's chromium, driven by the playwright Python package (which downloads no browser)
	test -x /usr/bin/chromium || { $(SUDO) apt-get update && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	touch $@

export: install
	$(BIN)/nbdev_export

# The pilot's committed records (trained on a GPU) are re-rendered, never retrained (--no-train fails naming a missing
# record). PILOT_RATES lists the learning rates it has run: its sweep's 1e-3 half is still to be trained.
PILOT_RATES ?= [0.003]
reports: install
	$(BIN)/so8lab report --preset $(PRESET) --out reports
	$(BIN)/so8lab report --preset pilot --out reports/pilot --no-train -p 'rates=$(PILOT_RATES)'

# One BLAS/OpenMP thread per process: two test processes share the two cores without oversubscription.
# The library notebooks run once, as nbdev_test runs them, and must reproduce their committed outputs
# (so8lab-docs notebooks); nbdev_test runs the report templates; then pytest.
test: install
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/so8lab-docs notebooks --workers 2
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/nbdev_test --path nbs/experiments --n_workers 2 --do_print --timing
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest -n 2 tests

# Re-execute the library notebooks and write their teaching outputs (after changing a notebook).
notebooks: install
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/so8lab-docs notebooks --write --workers 2

# The offline documentation site in _docs/ (open _docs/index.html) and README.md, both from the notebooks.
docs: install
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/so8lab-docs site --out _docs
	$(BIN)/so8lab-docs readme

benchmark: install
	$(BIN)/python benchmarks/bench_tasks.py

# JupyterLab serves the repository root, so nbs/ and reports/ are both reachable; as root it needs --allow-root.
lab: install
	$(BIN)/jupyter lab --ServerApp.root_dir=. --ip=127.0.0.1 $(ALLOW_ROOT)
