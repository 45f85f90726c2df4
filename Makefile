# hiq — one-command set-up. `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hiq-installed
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint rtn-table fixture-report clean

install: $(STAMP)

# torch first: the local CPU wheel when it exists and no CUDA GPU is present, else PyPI's torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif [ -n "$(TORCH_WHEEL)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "installing torch from $(TORCH_WHEEL)"; $(PY) -m pip install -q "$(TORCH_WHEEL)"; \
	else echo "installing torch from PyPI"; $(PY) -m pip install -q torch; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job on the bundled default: full precision vs RTN W2 on the bundled tiny LLaMA.
demo: $(STAMP)
	$(VENV)/bin/hiq eval --config configs/tiny/fp.yaml --output runs/demo/fp.json
	$(VENV)/bin/hiq eval --config configs/tiny/rtn-w2.yaml --output runs/demo/rtn-w2.json
	@echo "results: runs/demo/fp.json runs/demo/rtn-w2.json"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check hiq tests scripts benchmarks

# README's RTN table (every row, about 10 minutes on 2 cores)
rtn-table: $(STAMP)
	$(PY) benchmarks/rtn_table.py

clean:
	rm -rf $(VENV) runs .pytest_cache
