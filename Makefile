# One entry point for people and CI. `make test` sets up everything on a fresh machine
# (virtualenv, Debian's prometheus, the local control plane) and runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint check-generated generate unit e2e cluster chaos demo demo-down

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's Prometheus for the real-traffic tests; the tests start their own on loopback.
/usr/bin/prometheus:
	if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  $$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	  $$SUDO pkill -x prometheus || true; \
	fi

setup: $(STAMP) /usr/bin/prometheus

lint: $(STAMP)
	$(BIN)/ruff check operator tests e2e $(wildcard bench)
	$(BIN)/ruff format --check operator tests e2e $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy

check-generated: $(STAMP)
	$(BIN)/llm-operator generate --check

generate: $(STAMP)
	$(BIN)/llm-operator generate

unit: setup
	$(BIN)/pytest tests

# The local control plane: built once into ~/.cache/llm-operator (about 13 minutes cold on
# 2 cores), then started in seconds. LLMOP_CLUSTER=kind|existing uses another cluster instead.
cluster: $(STAMP)
	if [ "$${LLMOP_CLUSTER:-local}" = local ]; then $(BIN)/llm-operator dev cluster up; fi

e2e: setup cluster
	$(BIN)/pytest e2e

# The whole suite: code health, generated files, unit, real-traffic and end-to-end tests.
test: setup lint check-generated cluster
	$(BIN)/pytest tests e2e

# The drills (faults, load, bad input): the tests marked `drill`, then the gateway's
# connection, stream and soak bench and the operator's soak (SOAK_SECONDS each, default 600;
# results in bench/results).
chaos: setup cluster
	LLMOP_DRILL_INPUT_EXAMPLES=$${LLMOP_DRILL_INPUT_EXAMPLES:-1000} \
	  LLMOP_DRILL_N=$${LLMOP_DRILL_N:-100} LLMOP_DRILL_KILL_OBJECTS=$${LLMOP_DRILL_KILL_OBJECTS:-100} \
	  LLMOP_DRILL_KILLS=$${LLMOP_DRILL_KILLS:-100} LLMOP_DRILL_BURST=$${LLMOP_DRILL_BURST:-100} \
	  LLMOP_DRILL_CANARY_KILLS=$${LLMOP_DRILL_CANARY_KILLS:-100} \
	  $(BIN)/pytest -m drill tests e2e
	$(BIN)/python bench/gateway_soak.py --soak-seconds $${SOAK_SECONDS:-600}
	$(BIN)/python bench/operator_soak.py --seconds $${SOAK_SECONDS:-600}

# The main job: a local control plane, the operator, and a sample LLMDeployment.
demo: setup
	$(BIN)/python -m llm_operator_dev.demo up

demo-down: $(STAMP)
	$(BIN)/python -m llm_operator_dev.demo down
