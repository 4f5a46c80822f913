# rbee: `make run` installs and starts the hive; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/rbee serve

lint: install
	$(BIN)/ruff check actors serve_app tests bench
	$(BIN)/mypy

test: install
	$(BIN)/ruff check actors serve_app tests bench
	$(BIN)/mypy
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q

bench: install
	RAY_AUTH_MODE=disabled $(BIN)/python bench/download.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/cancel_latency.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/jobs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
