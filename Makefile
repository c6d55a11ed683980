# Two commands for a fresh machine (see README.md):
#   make run    create .venv, install the project, run the whole pipeline (`mlflow run .`, entry
#               point main) on the bundled default model
#   make test   create .venv if needed (and install PostgreSQL and Chromium from Debian's
#               packages for the tests), then ruff and the whole test suite
# Base images for Kubernetes (deploy/Dockerfile; needs docker):
#   make image-cpu, make image-cuda   build llm-to-mlflow-base:<flavor>-<hash of the pins>
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `mlflow run` reads the experiment from here; steps started without it use tracking.experiment.
export MLFLOW_EXPERIMENT_NAME ?= llm-to-mlflow

.PHONY: install test-packages run test image-cpu image-cuda

# pip (not uv) so that torch==2.13.0 resolves to the local CPU wheel.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local

# What the tests need from Debian's packages, installed when missing (which needs root):
# PostgreSQL for their tracking server (tests/servers.py starts a cluster of its own), and
# Chromium for the MLflow UI test (Playwright drives that binary; it never downloads a browser).
test-packages:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: install test-packages
	$(BIN)/ruff check steps tests bench tools deploy
	$(BIN)/ruff format --check steps tests bench tools deploy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The tag hashes the Dockerfile and the flavor's pins, so a changed pin never reuses a tag.
image-cpu image-cuda: image-%: install
	docker build -f deploy/Dockerfile --build-arg FLAVOR=$* \
		-t "$$($(BIN)/python deploy/images.py tag $*)" .
