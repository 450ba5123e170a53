# llamafleet — `make up` starts the whole stack with the demo model, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The benchmarks' peers, in a venv of their own: never a dependency of llamafleet.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

.PHONY: up down status install protos lint test test-gpu bench docker-offline clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet sglang-router==0.3.2
	touch $(PEERS_STAMP)

## Start SeaweedFS, storage, the MPI scheduler with 2 llama-server workers, postproc and gateway (Ctrl-C stops).
up: $(STAMP)
	$(BIN)/llamafleet up $(UP_ARGS)

down: $(STAMP)
	$(BIN)/llamafleet down

status: $(STAMP)
	$(BIN)/llamafleet status

## Regenerate the gRPC stubs in llamafleet/v1 and llamafleet/seaweedfs from protos/.
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd protos && ../$(BIN)/buf lint

# The bench smoke test runs SGLang's router too.
test: $(STAMP) $(PEERS_STAMP)
	$(BIN)/ruff check .
	cd protos && ../$(BIN)/buf lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The CuPy tests alone, on a CUDA machine (install CuPy for its CUDA first: pip install cupy-cuda12x).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## Prepare a machine without Docker Hub for docker-compose.offline.yml (base image, compose plugin).
docker-offline: $(STAMP)
	scripts/docker_offline.sh

clean:
	rm -rf .llamafleet .pytest_cache .ruff_cache .hypothesis
