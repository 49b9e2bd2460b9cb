# Set-up is idempotent: `.venv/.installed` is rebuilt only when the package metadata changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: setup data demo test fuzz lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing torch 2.13.0 (pinned, CPU wheel where available) ..."
	@$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	@echo "setup: installing largebatch and its dependencies ..."
	@$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# Offline data: Fashion-MNIST comes from Debian's package; the demo falls back to
# MNIST-1D (generated locally) when it cannot be installed.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "data: Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "data: installing Debian package dataset-fashion-mnist ..."; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
		|| echo "data: could not install dataset-fashion-mnist; the demo will use mnist1d"; \
	else \
		echo "data: Fashion-MNIST is not installed and this is not root;"; \
		echo "      run 'sudo apt-get install dataset-fashion-mnist' for it. The demo will use mnist1d."; \
	fi

demo: setup data
	@$(PY) -m largebatch.demo --out $(DEMO_OUT)

test: setup
	@$(PY) -m pytest -q

# Fresh random inputs for every reader (`make test` replays a fixed set).
FUZZ_EXAMPLES ?= 1000
fuzz: setup
	@LARGEBATCH_FUZZ=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

lint:
	@$(VENV)/bin/ruff check src tests benchmarks
	@$(VENV)/bin/ruff format --check src tests benchmarks

format:
	@$(VENV)/bin/ruff format src tests benchmarks
	@$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
