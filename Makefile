# make train [ARGS="model=mf split=kfold"]   make test   make help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: a CPU build on machines without an NVIDIA GPU, PyPI's default (CUDA) build with one.
# Override: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo $(TORCH_CPU_INDEX))
ARGS ?=

.PHONY: help install train test test-fast benchmark benchmark-ranking results clean

help:
	@echo "make train [ARGS='model=hybrid split=kfold']  set up .venv, fetch ML-100k, train, print the summary"
	@echo "make test                                     set up .venv, run the test suite"
	@echo "make benchmark                                ML-100k accuracy/time against Surprise and cornac (bench_out/)"
	@echo "make benchmark-ranking                        top-N against implicit and cornac: ML-100k + ML-20M-shaped (about 1.5 h)"
	@echo "make results                                  regenerate the README results table (ML-100k)"
	@echo "make install TORCH_INDEX=<pytorch wheel index> pick a torch build (e.g. a CUDA one)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, so nothing later pulls a multi-GB CUDA build on a CPU-only machine
$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request,sys; urllib.request.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)" --extra-index-url https://pypi.org/simple; \
	else \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[test,sweep,parquet,ann]"
	@touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/python scripts/train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

benchmark: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python scripts/benchmark.py --suite ml100k --out bench_out/ml100k

benchmark-ranking: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python scripts/benchmark.py --suite ranking --out bench_out/ranking

results: install
	$(BIN)/python scripts/results.py

clean:
	rm -rf $(VENV) .pytest_cache
