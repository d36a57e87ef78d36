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

.PHONY: venv demo test bench bench-gpu gpu-wheels clean

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
	$(BIN)/python -m pytest -q -s tests/perf -o python_files="bench_*.py test_*.py"

# The GPU check, on a machine with one CUDA GPU and no Ray: the system python3 that holds a CUDA
# torch, launched by torchrun; the wheels `make gpu-wheels` put in .whl (DeepSpeed and what that
# image lacks) are installed first, under /tmp, when they are there.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/relaygpt-site
bench-gpu:
	if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .whl/*.whl; fi; \
	PYTHONPATH=$(GPU_SITE):$$PYTHONPATH DS_ACCELERATOR=cuda $(GPU_PYTHON) -m torch.distributed.run --standalone --nproc-per-node 1 \
	    tests/perf/gpu_check.py --json gpu_check.json

# Wheels for the GPU machine (Python 3.12, x86-64; it has torch but no DeepSpeed, hjson or pydantic).
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(BIN)/python -m pip wheel -q --no-deps -w .whl "deepspeed==$$($(BIN)/python -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    hjson "pydantic==$$($(BIN)/python -c 'import pydantic; print(pydantic.VERSION)')" \
	    "pydantic-core==$$($(BIN)/python -c 'import pydantic_core; print(pydantic_core.__version__)')" annotated-types typing-inspection

clean:
	rm -rf $(VENV) .pytest_cache
