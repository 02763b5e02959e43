# The two commands of the README: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EVENTS ?= 50000
SEED ?= 1
DATA_DIR ?= agentstream-demo

.PHONY: demo test lint faults bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/agentstream demo --events $(EVENTS) --seed $(SEED) --data-dir $(DATA_DIR)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

faults: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/faults tests/test_hostile.py

bench: $(BIN)/.installed
	$(BIN)/agentstream bench

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache
