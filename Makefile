# Two commands on a fresh machine (see README):  make run   |   make test
PYTHON ?= python3
VENV ?= .venv
CLIENTS_VENV ?= .venv-clients
CONFIG ?= champion
PORT ?= 3000
UI_PORT ?= 5000
TRIALS ?= 60
SPACE ?= fast
# cheap trials (a subset of the images, few epochs, Hyperband), the best two retrained on all of them
TUNE_ARGS ?= --set data.train_limit=15000 --retrain-top 2 --retrain-set epochs=40
BIN := $(VENV)/bin
.DEFAULT_GOAL := help

## make help: this list (bare `make` shows it too)
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST) | sed -e 's/$$(CONFIG)/$(CONFIG)/g; s/$$(PORT)/$(PORT)/g; s/$$(UI_PORT)/$(UI_PORT)/g' \
	  -e 's/$$(TRIALS)/$(TRIALS)/g; s/$$(SPACE)/$(SPACE)/g; s/[$$][$$]/$$/g'

.PHONY: help run announce train tune serve bento draw ui test test-fast lint format install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-dev: $(BIN)/python $(CLIENTS_VENV)/installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'

# Triton's V2 clients for the tests, in their own environment (why: tests/service/clients/requirements.txt)
$(CLIENTS_VENV)/installed: tests/service/clients/requirements.txt
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r tests/service/clients/requirements.txt
	touch $@

## make run: install, train $(CONFIG), register and gate it, then serve the champion on $(PORT)
run: announce install train serve

announce:
	@echo "make run: 1) install into $(VENV) (a few minutes the first time)"
	@echo "          2) train the '$(CONFIG)' config (its plan line says how long; CONFIG=seed takes about a minute)"
	@echo "          3) serve the champion on http://127.0.0.1:$(PORT) (drawing page: /draw, or 'make draw'; runs: 'make ui')"

## make train: train $(CONFIG) (python -m pipeline train; after make install): log, export, register, gate
train:
	$(BIN)/python -m pipeline train --config $(CONFIG)

## make tune: a hyperparameter search of $(TRIALS) trials over the $(SPACE) space, an hour at most, then the best
## two retrained through the job and the gate (python -m pipeline tune; docs/pipeline.md)
tune: install
	$(BIN)/python -m pipeline tune --space $(SPACE) --trials $(TRIALS) --timeout 3600 $(TUNE_ARGS)

## make serve: serve the champion on http://127.0.0.1:$(PORT), gRPC on 8500 (after make install)
serve:
	GRPC_HOST=$${GRPC_HOST:-$${HOST:-127.0.0.1}} $(BIN)/bentoml serve service:Digits --host $${HOST:-127.0.0.1} --port $(PORT)

## make bento: package the service as a Bento (bentofile.yaml); `bentoml containerize digits:latest` makes its image
bento: install
	$(BIN)/bentoml build

## make draw: open the drawing page of the service running on $(PORT)
draw:
	@$(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$(PORT)/readyz', timeout=3)" 2>/dev/null \
	  || { echo "no service answers on port $(PORT): start one with 'make serve' (or 'make run') first"; exit 1; }
	@echo "drawing page: http://127.0.0.1:$(PORT)/draw"
	@$(BIN)/python -m webbrowser -t "http://127.0.0.1:$(PORT)/draw" >/dev/null 2>&1 || true

## make ui: the MLflow UI on $(UI_PORT) over this project's tracking store ($$MLFLOW_TRACKING_URI, else mlflow.db)
ui:
	@case "$${MLFLOW_TRACKING_URI:-}" in http*) echo "runs live on the tracking server: open $$MLFLOW_TRACKING_URI"; exit 0;; esac; \
	  echo "MLflow UI: http://127.0.0.1:$(UI_PORT) (Ctrl-C stops it)"; \
	  $(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $(UI_PORT)

## make test: install with the dev extra and run every test (make test-fast skips the slow end-to-end ones)
# Two pytest workers (pytest-xdist), a whole test file to one worker, so module fixtures are built once;
# most slow tests wait on child processes (servers starting, training, pauses), which leaves a core free.
TEST_WORKERS ?= 2
test: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow"

## make lint: ruff's lint and format checks (make format applies the formatting)
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) mlflow.db mlartifacts exports optuna.db
