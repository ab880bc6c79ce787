# step-infra: the two commands a newcomer needs are `make demo` and `make test`.
# Every target builds .venv itself from the machine's python3; a stamp keyed on the hash of
# pyproject.toml and this Makefile makes a second run skip installation entirely.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keyed on both files: the Makefile names the extras that get installed.
INSTALL_HASH := $(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(INSTALL_HASH)
# The CPU wheel of torch lies on local disk; a bare `torch` requirement would pull a CUDA build.
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv demo test test-all lint bench gpu-check clean

help:
	@echo "make demo      the main job end to end on embedded defaults"
	@echo "make test      fast suite (unit + integration), < 10 min on 2 cores"
	@echo "make test-all  adds tests marked slow"
	@echo "make lint      ruff + mypy"
	@echo "make bench     every benchmark in benchmarks/, JSON results in runs/bench/"
	@echo "make gpu-check every GPU figure in one run (benchmarks/gpu_suite.py), JSON in runs/bench/"

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev,text]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(BIN)/step-infra demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow or not slow' $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check step_infra tests benchmarks
	$(BIN)/ruff format --check step_infra tests benchmarks
	$(BIN)/mypy step_infra

bench: $(STAMP)
	@mkdir -p runs/bench
	@set -e; found=0; for script in benchmarks/*.py; do \
		[ -e "$$script" ] || continue; case $$(basename $$script) in _*) continue;; esac; found=1; \
		name=$$(basename $$script .py); \
		echo "== $$script"; \
		$(BIN)/python $$script --json runs/bench/$$name.json; \
	done; \
	if [ $$found = 0 ]; then echo "no benchmarks in benchmarks/ yet"; else echo "results in runs/bench/"; fi

gpu-check: $(STAMP)
	@mkdir -p runs/bench
	$(BIN)/python benchmarks/gpu_suite.py --json runs/bench/gpu_suite.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
