# Two commands on a fresh machine (see README):  make run   |   make test
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= champion
PORT ?= 3000
BIN := $(VENV)/bin

.PHONY: run train serve test test-fast install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

## make run: install, train $(CONFIG), register and gate it, then serve the champion on $(PORT)
run: install train serve

train:
	$(BIN)/python -m pipeline train --config $(CONFIG)

serve:
	GRPC_HOST=$${GRPC_HOST:-$${HOST:-127.0.0.1}} $(BIN)/bentoml serve service:Digits --host $${HOST:-127.0.0.1} --port $(PORT)

## make test: install with the dev extra and run every test (make test-fast skips the slow end-to-end ones)
test: install-dev
	$(BIN)/python -m pytest

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) mlflow.db mlartifacts exports
