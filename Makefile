# Quickstart: `make demo` (set up + small CPU pretraining run) and `make test` (set up + test suite).
# Set-up pins the CPU torch wheel so no CUDA build is downloaded on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
RUN_DIR ?= runs/demo
DATA_DIR ?= data/demo

.PHONY: setup demo test test-torch-min lint bench gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

$(DATA_DIR)/corpus_text_document.idx: $(VENV)/.installed
	$(PY) -m megatron_moe.data.demo_corpus --output-dir $(DATA_DIR)

demo: $(VENV)/.installed $(DATA_DIR)/corpus_text_document.idx
	rm -rf $(RUN_DIR)  # a fresh run each time (metrics.jsonl is appended to on resume)
	$(PY) pretrain_moe.py --config examples/tiny_cpu.toml --save $(RUN_DIR)
	$(PY) -m megatron_moe.training.plot $(RUN_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The suite on the oldest torch the package admits (pyproject: torch>=2.11; also what the lent GPU machines
# run). PyPI has only CUDA builds of it: this downloads about 3 GB into .venv-torch-min (opt-in, not in CI).
# Deselected: a test that wants stderr to be one line, which the CUDA build's "No CUDA runtime" warning breaks.
# `rm -rf .venv-torch-min; make test-torch-min PYTHON=python3.12` mirrors the lent GPU machines (Python 3.12, torch 2.11).
TORCH_MIN ?= torch==2.11.0
test-torch-min:
	$(PYTHON) -m venv .venv-torch-min
	.venv-torch-min/bin/python -m pip install -q "$(TORCH_MIN)"
	.venv-torch-min/bin/python -m pip install -q -e ".[test]"
	.venv-torch-min/bin/python -m pytest -q tests \
		--deselect tests/test_pretrain_cli.py::test_cli_error_has_no_traceback

bench: $(VENV)/.installed  # training throughput vs Hugging Face Mixtral and ablations (CPU: about 3 minutes)
	$(PY) bench/throughput.py

gpu-wheels:  # what scripts/gpu_session.sh needs on a lent GPU machine (Python 3.12, no network) that it lacks
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 \
		torchtitan==0.3.0 spmd-types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard  # the bench's torchtitan row

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-torch-min runs data/demo
