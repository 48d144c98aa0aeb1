# The README's commands: `make train` runs the main job, `make test` runs the tests.
# Both create the virtual environment on first use (CPU torch from the local wheel, never a CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TRAIN_ARGS ?=

.PHONY: setup train test test-fast lint bench bench-quick experiments-quick clean test-llamacpp

$(BIN)/lorakit: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/lorakit

setup: $(BIN)/lorakit

train: setup
	$(BIN)/lorakit train $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Opt-in: builds llama-cpp-python from its PyPI sdist once (~30 min on two cores, cached in ~/.cache/lorakit/llamacpp)
# and checks lorakit's GGUF files in llama.cpp itself (tests/test_llamacpp.py; skipped by `make test`).
test-llamacpp: setup
	$(BIN)/python tests/llamacpp_tools.py install
	LORAKIT_TEST_LLAMACPP=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider -m llamacpp tests/test_llamacpp.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/mypy src

bench: setup
	$(BIN)/python -m benchmarks.run_all

bench-quick: setup
	$(BIN)/python -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
