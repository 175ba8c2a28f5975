# `make demo`: set up and run qomni on the tiny demo checkpoint.
# `make test`: set up (Python deps, test media packages) and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test lint

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build (an unpinned torch pulls the CUDA stack)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

setup-test: setup
	bash scripts/install-test-media.sh
	$(BIN)/pip install -q -e '.[serve,test]'

demo: setup
	$(BIN)/qomni generate --prompt "Hello! What can you do?" --max-new-tokens 32

test: setup-test
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check qomni tests
