# The two commands of the README: `make run` and `make test`. Both set up what is missing first.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test bench clean

setup:
	@bash deploy/setup.sh

run: setup
	@$(VENV)/bin/aether serve

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
