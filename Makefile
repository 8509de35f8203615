# amalgam: set-up, demo, tests. Everything runs offline; `make demo` and `make test` set up on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test test-all lint bench-throughput bench-accuracy bench-accuracy-gpu clean

setup: $(VENV)/.installed $(FASHION)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "amalgam needs Python >= 3.11 and \
	$(PYTHON) is $$($(PYTHON) --version 2>&1): install a newer one and name it, e.g. make PYTHON=python3.11 \
	$(or $(MAKECMDGOALS),setup)" >&2; exit 1; }
	@# Debian/Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own (python3.X-venv).
	$(PYTHON) -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq \
	python$$($(PYTHON) -c 'import sys; print(*sys.version_info[:2], sep=".")')-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Real, offline data: Debian's Fashion-MNIST package (idx files under /usr/share/datasets/fashion-mnist).
$(FASHION):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Teachers (skipped when their checkpoints exist) -> amalgamation -> evaluation -> reports/demo/summary.{json,md}
demo: setup
	$(PY) -m amalgam.demo

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ''

lint: setup
	$(PY) -m ruff check amalgam tests benchmarks notebooks

bench-throughput: setup
	$(PY) benchmarks/throughput.py

bench-accuracy: setup
	$(PY) benchmarks/accuracy.py

# The GPU preset's grid, one process per (setting, seed) on one GPU; results in reports/accuracy-gpu/.
bench-accuracy-gpu: setup
	PYTHON=$(PY) bash benchmarks/accuracy_gpu.sh reports/accuracy-gpu

clean:
	rm -rf artifacts reports lightning_logs
