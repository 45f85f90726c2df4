# hiq — one-command set-up. `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hiq-installed
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint rtn-table ablation bench configs fixture-report clean

install: $(STAMP)

# torch first: the local CPU wheel when it exists and no CUDA GPU is present, else PyPI's torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif [ -n "$(TORCH_WHEEL)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "installing torch from $(TORCH_WHEEL)"; $(PY) -m pip install -q "$(TORCH_WHEEL)"; \
	else echo "installing torch from PyPI"; $(PY) -m pip install -q torch; fi
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

# The main job on the bundled default: the method end to end (Fisher -> M -> ratios -> hybrid reconstruction ->
# export -> WikiText-2/C4 perplexity) on the bundled tiny LLaMA, W2 setting. Rerunning resumes/reuses.
DEMO_RUN ?= runs/demo-w2
demo: $(STAMP)
	$(VENV)/bin/hiq fit --config configs/tiny/w2.yaml --trainer.default_root_dir=$(DEMO_RUN)
	@echo "results: $(DEMO_RUN)/metrics.json  (quantized model: $(DEMO_RUN)/model, ratios: $(DEMO_RUN)/ratios.json)"
	@$(PY) -c "import json; m = json.load(open('$(DEMO_RUN)/metrics.json')); \
	print(f\"{m['setting']}: {m['avg_bits']:.3f} avg bits, WikiText-2 ppl {m['wikitext2_ppl']:.2f}, C4-sample ppl {m['c4_ppl']:.2f}\")"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check hiq tests scripts benchmarks

# README's RTN table (every row, about 10 minutes on 2 cores)
rtn-table: $(STAMP)
	$(PY) benchmarks/rtn_table.py

# README's ablation table (paper Table 4 on the bundled model; about 25 minutes per setting on 2 cores)
ablation: $(STAMP)
	$(PY) benchmarks/ablation.py

# README's peer table: hiq vs RTN, GPTQ, AWQ (llmcompressor), AutoRound, HQQ on the bundled model. The peers run in
# their own venvs (.venv-peers, .venv-peers-autoround; their pins clash with ours); every row is cached in runs/bench
bench: $(STAMP)
	bash benchmarks/peer_tools/setup.sh
	$(PY) benchmarks/peer_table.py --reuse runs/ablation --keep-going

# configs/*/*.yaml are written by one script from one template
configs: $(STAMP)
	$(PY) scripts/make_configs.py

clean:
	rm -rf $(VENV) runs .pytest_cache
