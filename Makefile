# llmcli: `make demo` sets up .venv and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LLMCLI := $(VENV)/bin/llmcli
CONFIG ?= configs/default.yaml
# Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
TORCH  := torch==2.13.0

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(LLMCLI) preprocess $(CONFIG)
	$(LLMCLI) train $(CONFIG) | tee .last_run
	$(LLMCLI) eval $$(tail -n 1 .last_run)
	$(LLMCLI) generate $$(tail -n 1 .last_run) --prompt "In the beginning"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check llmcli tests bench

clean:
	rm -rf $(VENV) .last_run .pytest_cache
