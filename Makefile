# make demo / make test / make bench each create .venv first when it is missing.
# torch is installed on its own, before anything that depends on it: TORCH_SPEC picks the
# build (the default is the CPU wheel; GPU users set e.g. TORCH_SPEC="torch==2.13.0").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.relaygpt-installed
SHARED ?= $(abspath ../shared)

export DS_ACCELERATOR ?= cpu
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relaygpt run jobs/tiny-assistant.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/perf --durations=25

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/perf

clean:
	rm -rf $(VENV) .pytest_cache
