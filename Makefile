# The two commands a newcomer needs: `make demo` and `make test`.
# Both create a local virtual environment (.venv) and install jaxgrad into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Extra flags for the demo run, e.g. DEMO_FLAGS=--on_config_change=rerun after editing the config.
DEMO_FLAGS ?=

demo: $(STAMP)
	$(BIN)/python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo $(DEMO_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Regenerate the tiny Hugging Face checkpoints and reference logits under tests/fixtures/.
# Needs torch, transformers and peft (torch from the local CPU wheel: pip install torch==2.13.0).
fixtures: $(STAMP)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q peft
	$(BIN)/python tests/fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) *.egg-info
