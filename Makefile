# eenet: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat constraints.txt setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
DATA_ROOT ?= ../shared/data
OUT ?= outputs
# fewer page faults in fresh processes; two threads on this 2-core machine
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000

.DEFAULT_GOAL := help
.PHONY: help install demo test lint test-slow test-all experiments-core tables clean

help: ## show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): constraints.txt setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev,export,sweep]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install the pinned dependencies (constraints.txt)

# The demo: 8 epochs on one thread (these 8x8 convolutions are too small to share
# between threads, and one thread keeps the timings steady on a shared machine);
# thresholds chosen on val for the best accuracy at a fifth of the network's MACs,
# then the test split through the dynamic engine run by onnxruntime (engine=eager or
# compiled for the others: at batch 1 on these tiny inputs onnxruntime pays the least
# per-operation overhead), timed against the same network with every early exit off on the
# same backend; the closing lines give the backend, the mean and p95 time per sample at
# batch 1 and the measured speed-up.
demo: $(STAMP) ## train resnet20 + 2 exits on the bundled digits, calibrate on val, measure the real early-exit speed-up
	@test ! -e $(OUT)/demo/results.json || { echo "error: $(OUT)/demo holds a finished demo run; move it away or give OUT=<another folder>" >&2; exit 2; }
	$(VENV)/bin/eenet-train hydra.run.dir=$(OUT)/demo trainer.enable_progress_bar=false trainer.max_epochs=8 threads=1
	$(VENV)/bin/eenet-eval run=$(OUT)/demo budget=0.2 threads=1 latency=true engine=onnxruntime hydra.run.dir=$(OUT)/demo/eval

test: lint ## the linter, then the tests (slow ones excluded) in 2 one-thread workers
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow" -q -n 2 --durations=15

lint: $(STAMP) ## ruff (pinned in constraints.txt; rules in pyproject.toml)
	$(VENV)/bin/ruff check eenet tests experiments

test-slow: $(STAMP) ## run only the slow tests
	$(PY) -m pytest -m slow -q

test-all: $(STAMP) ## run every test
	$(PY) -m pytest -q

experiments-core: $(STAMP) ## Core acceptance: MNIST lambda sweep and training-throughput benchmark
	$(PY) experiments/mnist_core/run.py --data $(DATA_ROOT)
	$(PY) experiments/bench/bench_train.py --data $(DATA_ROOT)

SMOKE ?=
CIFAR10 ?=
TABLE_ARGS ?=
table-%: $(STAMP) ## paper tables: table-eenets, table-baselines, table-pteenet, table-trecx (SMOKE=1: tiny data; CIFAR10=1: train the CIFAR-10 (JPEG) rows, CPU hours)
	SMOKE=$(SMOKE) CIFAR10=$(CIFAR10) $(PY) experiments/tables.py $* --data $(DATA_ROOT) $(TABLE_ARGS)

tables: $(STAMP) ## every paper table (SMOKE=1 runs each pipeline on tiny data in a few minutes)
	SMOKE=$(SMOKE) CIFAR10=$(CIFAR10) $(PY) experiments/tables.py all --data $(DATA_ROOT) $(TABLE_ARGS)

clean: ## remove outputs, multirun folders and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .hypothesis
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
