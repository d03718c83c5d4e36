# aq-brevitas: `make demo` and `make test` each set everything up on a fresh machine, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aq-installed
DATA_DIR ?= $(or $(AQ_DATA_DIR),/usr/share/datasets/fashion-mnist)
PYTEST_ARGS ?= -n 2

.PHONY: setup data demo test lint docs-check bench fuzz clean

# The venv is rebuilt only when pyproject.toml changes; a second `make demo` installs nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel; installing it first keeps pip from pulling a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,pt2e]'
	# torchattacks 3.5.1 declares requests~=2.25.1 and torchvision but imports neither (its runtime
	# imports are torch, scipy and tqdm). torchvision from the registry would replace torch with a CUDA
	# build or fail to import beside torch 2.13, so it is installed without its declared dependencies.
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files).
data:
	@if ls $(DATA_DIR)/*idx3-ubyte* >/dev/null 2>&1; then \
		echo "data: IDX files found in $(DATA_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null && echo "data: installed dataset-fashion-mnist"; \
	else \
		echo "data: no IDX files in $(DATA_DIR). Run 'sudo apt-get install -y dataset-fashion-mnist', or set AQ_DATA_DIR to a directory of *-idx?-ubyte[.gz] files."; exit 1; \
	fi

demo: setup
	$(VENV)/bin/aq-brevitas run --model cnn-pgd --budget avg-bits=3 --eps 0.1 --out runs/demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) -q

lint: $(STAMP)
	$(VENV)/bin/ruff check aq_brevitas tests examples benchmarks
	$(VENV)/bin/ruff format --check aq_brevitas tests examples benchmarks

docs-check: setup
	$(PY) -m pytest -q tests/test_docs.py tests/test_examples.py tests/test_reference.py

bench: setup
	$(PY) benchmarks/run_all.py

# A larger hypothesis run: random architectures through score -> search -> quantize -> export parity,
# and malformed policy JSON.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_policy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
