# The suite's commands. `make setup` builds .venv; every other target builds it first if missing.
# A cluster user points CONSTRAINTS at a file that pins their CUDA torch (or leaves torch unpinned):
#   make setup CONSTRAINTS=my-constraints.txt
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python

.PHONY: setup test test-all bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Fast tests (the default, < 10 minutes on 2 cores). `make test-all` adds the ones marked slow.
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# Per-step time of each GP with and without AP, and the DoPr-X / X ratios (see README).
bench: setup
	$(PY) scripts/bench_optimizer.py

clean-venv:
	rm -rf $(VENV)
