# aq-brevitas: `make demo` and `make test` each set everything up on a fresh machine, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aq-installed
DATA_DIR ?= $(or $(AQ_DATA_DIR),/usr/share/datasets/fashion-mnist)
PYTEST_ARGS ?= -n 2

.PHONY: setup data demo test test-latest lock lint docs-check bench fuzz clean

LOCK := requirements/lock.txt

# Installing without the lock: the local torch CPU wheel first (so pip never pulls a multi-GB CUDA
# build), then the project's declared ranges. torchattacks 3.5.1 declares requests~=2.25.1 and
# torchvision but imports neither (its runtime imports are torch, scipy and tqdm); torchvision from
# the registry would replace torch with a CUDA build or fail to import beside torch 2.13, so it is
# installed without its declared dependencies. finn-plus 1.6.1 (FINN's own front end, the [finn] extra)
# goes in with --no-deps too: it pins brevitas==0.13.0, which needs setuptools<70 and so conflicts with
# torch 2.13.0+cpu (setuptools>=77.0.3) -- pip would backtrack to a multi-GB CUDA torch -- and FINN's
# code never imports brevitas (brevitas 0.13.4 stays). Its real runtime requirements are the [finn]
# extra in pyproject.toml. $(1) is the venv's python. Used by `lock` and `test-latest` only: `setup`
# installs the lock.
define install_unlocked
	$(1) -m pip install -q --upgrade pip
	$(1) -m pip install -q torch==2.13.0
	$(1) -m pip install -q -e '.[dev,pt2e,finn]'
	$(1) -m pip install -q --no-deps torchattacks==3.5.1 finn-plus==1.6.1
endef

# What `pip check` must print on the locked venv, exactly (tests/test_lock.py holds the same lines):
# torchattacks' two (requirements it declares but never imports), and the pins finn-plus declares but does not need
# at these versions (brevitas 0.13.0; onnx, onnxruntime, protobuf, matplotlib, bitstring decided by the
# lock, with which FINN's builder steps run and match the QONNX files in tests/test_finn.py).
define PIP_CHECK_EXPECTED
finn-plus 1.6.1 has requirement bitstring<4.4.0,>=4.3.1, but you have bitstring 5.0.0.
finn-plus 1.6.1 has requirement brevitas==0.13.0, but you have brevitas 0.13.4.
finn-plus 1.6.1 has requirement matplotlib<3.11.0,>=3.10.9, but you have matplotlib 3.11.2.
finn-plus 1.6.1 has requirement onnx==1.21.0, but you have onnx 1.23.2.
finn-plus 1.6.1 has requirement onnxruntime==1.25.1, but you have onnxruntime 1.32.0.
finn-plus 1.6.1 has requirement protobuf==5.29.6, but you have protobuf 7.36.2.
torchattacks 3.5.1 requires requests, which is not installed.
torchattacks 3.5.1 requires torchvision, which is not installed.
endef
export PIP_CHECK_EXPECTED

# The venv holds exactly the tested set: every package at the version in $(LOCK), finn-plus and its
# runtime requirements included (the [finn] extra). The lock is complete, so it installs with --no-deps
# (which also keeps torchattacks' and finn-plus's unneeded declared requirements out), and `pip check`
# then must print exactly $(PIP_CHECK_EXPECTED).
# Rebuilt only when pyproject.toml or the lock changes; a second `make demo` installs nothing.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	diff <($(PY) -m pip check | sort) <(echo "$$PIP_CHECK_EXPECTED" | sort)
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

# The main job on the embedded default (a FINN-ready policy: --target finn is run's default; FINN's
# estimates are printed), then robust accuracy per BOPs for every method (the Pareto sweep, with its plot).
# The headline -- the per-image worst case over the attack suite at eps = 0.1 for the float, uniform and
# searched models -- is on 500 test images; the other radii on 100 of them, and the sweep at three budgets,
# so the demo ends in minutes on 2 cores. `make demo FULL=1` is the full-size job (2,000 test images at
# every radius, held-out checks on 500 images, five budgets).
ifeq ($(FULL),1)
DEMO_RUN_SIZES := --test-images 2000 --eval-eps-images 0 --val-images 500 --workers 2
DEMO_PARETO_SIZES := --val-images 500 --widths 2 3 4 5 8 --workers 2
else
DEMO_RUN_SIZES := --test-images 500 --eval-eps-images 100 --val-images 200 --workers 2
DEMO_PARETO_SIZES := --val-images 100 --widths 2 3 4 --workers 2
endif

demo: setup
	$(VENV)/bin/aq-brevitas run --model cnn-pgd --budget avg-bits=3 --eps 0.1 $(DEMO_RUN_SIZES) --out runs/demo
	$(VENV)/bin/aq-brevitas pareto --model cnn-pgd $(DEMO_PARETO_SIZES) --out runs/demo/pareto

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) -q

lint: $(STAMP)
	$(VENV)/bin/ruff check aq_brevitas tests examples benchmarks tools
	$(VENV)/bin/ruff format --check aq_brevitas tests examples benchmarks tools

# Every ```python block in README.md and docs/, every >>> example in aq_brevitas's docstrings (and one on
# each core public function), the architecture diagram against the imports, examples/, and the
# generated reference pages (python tools/reference.py) being current.
docs-check: setup
	$(PY) -m pytest -q tests/test_docs.py tests/test_examples.py tests/test_reference.py

bench: setup
	$(PY) benchmarks/run_all.py

# A larger hypothesis run: random architectures through score -> search -> quantize -> export parity,
# and malformed policy JSON.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_policy.py

# Refresh the lock: a clean venv from the declared ranges, frozen. Run it, then `make test`, and
# commit requirements/lock.txt only if the tests pass.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(call install_unlocked,.venv-lock/bin/python)
	{ echo "# Generated by 'make lock' from a clean venv on $$(date -u +%Y-%m-%d); install with"; \
	  echo "# pip install --no-deps -r $(LOCK) (see Makefile). Do not edit by hand."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# Not in CI: the newest versions the declared ranges allow, what changed against the lock, and the
# tests on them (the lock-match test is left out: it fails by design when anything changed).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	$(call install_unlocked,.venv-latest/bin/python)
	@.venv-latest/bin/python -m pip freeze --all --exclude-editable | diff <(grep -v '^#' $(LOCK)) - \
		&& echo "test-latest: same versions as $(LOCK)" || echo "test-latest: the lines above changed against $(LOCK)"
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS) -q --deselect tests/test_lock.py::test_venv_matches_lock

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .pytest_cache .ruff_cache .hypothesis
