# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv first when needed. On a CUDA machine: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup demo test test-slow test-slurm gpu-check gpu-check-dry clean-demo

setup: $(VENV)/.installed

# torch first and pinned (a plain `pip install torch` pulls a multi-GB CUDA build), then the rest
# with the tested versions from constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# CI runs these too: the slow and multi-process tests, and the real Slurm cluster test.
test-slow: setup
	$(BIN)/python -m pytest -m "slow or multiprocess" $(PYTEST_ARGS)

test-slurm: setup
	$(BIN)/python -m pytest -m slurm $(PYTEST_ARGS)

# The first campaign on a GPU machine (< 8 min on one H200): one table, gpu_check.json under runs/gpu-check/.
# gpu-check-dry: the same on the CPU, tiny preset and data (< 3 min on 2 cores); CI runs it via test-slow.
gpu-check: setup
	PY=$(BIN)/python bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

gpu-check-dry: setup
	PY=$(BIN)/python bash scripts/gpu_check.sh --dry-run $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf .demo
