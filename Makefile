# `make serve`: set up and run the server (OpenAI API + web demo) on the tiny demo checkpoint.
# `make demo`: set up and answer one prompt (text and speech) from the command line.
# `make test`: set up (Python deps, test media packages, headless browser) and run the tests.
# Set-up steps run again only when pyproject.toml changes (stamp files in the venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup setup-test serve demo test lint
MODEL ?=
PORT ?= 8000

setup: $(VENV)/.setup-core

$(VENV)/.setup-core: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build (an unpinned torch pulls the CUDA stack)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.setup-serve: $(VENV)/.setup-core
	$(BIN)/pip install -q -e '.[serve]'
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup-core
	$(BIN)/pip install -q -e '.[serve,test]'
	touch $@

setup-test: $(VENV)/.setup-test
	bash scripts/install-test-media.sh

serve: $(VENV)/.setup-serve
	$(BIN)/qomni serve $(if $(MODEL),--model $(MODEL)) --port $(PORT)

demo: setup
	mkdir -p $(OUT)
	$(BIN)/qomni generate $(if $(MODEL),--model $(MODEL)) --prompt "Hello! What can you do?" \
		--max-new-tokens 32 --output $(OUT)/reply.wav

test: setup-test
	$(BIN)/python -m pytest -q --durations=20

lint:
	$(BIN)/ruff check qomni tests
