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
	$(BIN)/python -m pip install -q -e '.[test,ray,ui]'
	touch $@

# The browser test drives Debian's Chromium (no downloaded browser builds).
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup demo test test-fast chromium
setup: $(BIN)/crome

chromium:
	@test -x $(CHROMIUM) || (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 \
		|| echo "The browser test needs Chromium: run 'sudo apt-get install chromium' (or set CROME_CHROMIUM)." >&2

demo: setup
	$(BIN)/crome demo

test: setup chromium
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow"
