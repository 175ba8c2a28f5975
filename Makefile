# `make serve`: set up and run the server (OpenAI API + web demo) on the tiny demo checkpoint.
# `make demo`: set up and answer one prompt (text and speech) from the command line.
# `make test`: set up (Python deps, test media packages, headless browser) and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test serve demo test lint
MODEL ?=
PORT ?= 8000

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build (an unpinned torch pulls the CUDA stack)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

setup-test: setup
	bash scripts/install-test-media.sh
	$(BIN)/pip install -q -e '.[serve,test]'

serve: setup
	$(BIN)/pip install -q -e '.[serve]'
	$(BIN)/qomni serve $(if $(MODEL),--model $(MODEL)) --port $(PORT)

demo: setup
	$(BIN)/qomni generate $(if $(MODEL),--model $(MODEL)) --prompt "Hello! What can you do?" \
		--max-new-tokens 32 --output reply.wav

test: setup-test
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check qomni tests
