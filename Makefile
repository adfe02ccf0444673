# The two commands of the README: `make run` and `make test`. Both set up what is missing first.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint bench docs clean fleet-demo

setup:
	@bash deploy/setup.sh

run: setup
	@$(VENV)/bin/aether serve

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

# ruff (format and lint) and mypy, configured in pyproject.toml; .ci/run runs this before the tests.
lint: setup
	@$(VENV)/bin/ruff format --check --quiet .
	@$(VENV)/bin/ruff check --quiet .
	@$(VENV)/bin/mypy

bench: setup
	@$(PY) bench/run_all.py

# A local fleet (Redis, three VMs as network namespaces, two gateways), as root; docs/fleet.md.
# `deploy/fleet-demo.sh stop` removes it.
fleet-demo: setup
	@bash deploy/fleet-demo.sh

# The settings tables of docs/settings.md, from aether/settings/table.py.
docs: setup
	@$(PY) -m aether.settings --write docs/settings.md

clean:
	rm -rf $(VENV) build *.egg-info
