# The two commands of the README: `make demo` and `make test`. Each creates .venv itself and
# installs exactly the versions in uv.lock (`make upgrade` is the one way they change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The uv that installs the lock; equal to the uv pinned in pyproject's dev extra.
UV_VERSION := 0.13.9
UV := UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv
EVENTS ?= 50000
SEED ?= 1
DATA_DIR ?= agentstream-demo

.PHONY: demo test lint faults bench lock upgrade check-lock clean

# --locked: a pyproject.toml edited without `make lock` stops here instead of installing
# something the lock does not say.
$(BIN)/.installed: pyproject.toml uv.lock
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION); }
	$(UV) sync --locked --extra dev --python $(BIN)/python --quiet
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

# After editing dependencies in pyproject.toml: resolve them into uv.lock.
lock: $(BIN)/.installed
	$(UV) lock

# The deliberate upgrade: newest versions pyproject allows, re-locked, installed, tested.
upgrade: $(BIN)/.installed
	$(UV) lock --upgrade
	$(UV) sync --locked --extra dev
	$(MAKE) test

# Whether .venv holds exactly what uv.lock says.
check-lock: $(BIN)/.installed
	$(UV) sync --locked --extra dev --check

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache
