# One virtual environment per checkout. The CPU build of torch is installed first, pinned, so
# that nothing later resolves an unpinned torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m csp_inductor demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m pytest bench/ --benchmark-columns=min,median,max --benchmark-sort=name
