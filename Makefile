# The two commands of the README: `make run` and `make test`. Both set up what is missing first.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test bench docs clean

setup:
	@bash deploy/setup.sh

run: setup
	@$(VENV)/bin/aether serve

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@$(PY) bench/run_all.py

# The settings tables of docs/settings.md, from aether/settings/table.py.
docs: setup
	@$(PY) -m aether.settings --write docs/settings.md

clean:
	rm -rf $(VENV) build *.egg-info
