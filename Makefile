# One command each: `make demo` (set up + run the main job), `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch (a wheel on this machine's disk); with a GPU, install your own torch build first.
TORCH  ?= torch==2.13.0

$(BIN)/crome: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $@

.PHONY: setup demo test test-fast
setup: $(BIN)/crome

demo: setup
	$(BIN)/crome demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not integration"
