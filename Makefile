# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench soak clean install

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls and an
# unchanged one costs nothing.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/volley serve

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Micro benchmarks, then the end-to-end receive and relay runners (a few minutes).
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/relay.py

clean:
	rm -rf $(VENV) var build *.egg-info
