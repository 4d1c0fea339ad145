# Set-up in two commands: `make demo` and `make test` (each creates .venv if missing).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

# A machine with an NVIDIA GPU gets the CUDA build of torch and onnxruntime-gpu;
# every other machine gets the CPU build of torch (never a multi-GB CUDA wheel)
# and onnxruntime.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU),1)
ORT_EXTRA := gpu
TORCH_SPEC := torch==2.13.0
else
ORT_EXTRA := cpu
TORCH_SPEC := torch==2.13.0+cpu
endif
EXTRAS := $(ORT_EXTRA),optimum,triton,modelopt,serve,bench,digits,dev
# `sdcompiler serve` runs the Triton Inference Server inside the nvidia-pytriton wheel (x86_64 Linux only).
# Installed without its dependencies: it declares numpy<2 for pytriton's own Python API, which sdcompiler does
# not use. Its Python backend stub does need numpy 1 (it garbles tensors under numpy 2): numpy 1.26 goes into
# a folder of its own that only the stub's path gets (sdcompiler.knobs.triton_stub_site).
PYTRITON := nvidia-pytriton==0.7.0
STUB_SITE := $(VENV)/share/sdcompiler/triton-stub-site
SERVE_PLATFORM := $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo 1 || echo 0)
STAMP := $(VENV)/.installed-$(ORT_EXTRA)

CHECKPOINT ?=
RECIPE ?=
TARGET ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test test-fast lint format bench bench-full install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || \
	  $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
ifeq ($(SERVE_PLATFORM),1)
	$(PY) -m pip install -q --no-deps "$(PYTRITON)"
	$(PY) -m pip install -q --no-deps --upgrade --target "$(STUB_SITE)" numpy==1.26.4
endif
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m sdcompiler demo \
	  $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") \
	  $(if $(RECIPE),--recipe "$(RECIPE)") \
	  $(if $(TARGET),--target "$(TARGET)")

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the inner loop: tests/unit without the slow ones (no end-to-end compile; under ~2 minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

# ruff (pinned in the dev extra, configured in pyproject.toml); tests/unit/test_style.py runs the same checks
lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

# the report (benchmarks/bench_report.py): our variants and the peers on the full SD1.5 architecture, JSON +
# Markdown + plots in benchmarks/results/; e.g. BENCH_ARGS="--tiny" or BENCH_ARGS="--variants none:onnx --peers ''"
# bench: 2 rounds, no batch-4 calls (warm caches, quiet 2 cores: 18.8 min, results/report_runs.json), results/report.*;
# bench-full: 3 rounds and a batch-4 call per subject (the first full run's settings), results/report_full.*
bench: $(STAMP)
	$(PY) benchmarks/bench_report.py $(BENCH_ARGS)

bench-full: $(STAMP)
	$(PY) benchmarks/bench_report.py --full $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo-out
