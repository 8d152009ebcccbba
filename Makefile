# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench soak clean install bench-peers

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

test: lint
	$(BIN)/python -m pytest -q tests

# Style and types: ruff over every Python tree, mypy (strict) over the engine.
lint: $(STAMP)
	$(BIN)/ruff check engine tests bench tools
	$(BIN)/mypy

# The whole loop on loopback (lab DNS, sinks, `volley serve`, blast) and a one-screen report.
.PHONY: demo
demo: $(STAMP)
	$(BIN)/volley demo

# Micro benchmarks, then the one end-to-end runner: Volley beside Postfix and
# aiosmtpd+LMDB (peers from `make bench-peers`; a missing peer's rows are skipped with
# a note), one table and bench/results/latest.json (~11-15 min on 2 cores).
# bench/e2e.py and bench/relay.py remain as quicker developer runners.
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only
	$(BIN)/python bench/run.py

# The peers of bench/run.py: Postfix (apt-get, needs root; skipped with a message
# otherwise) and aiosmtpd in the venv. Idempotent.
bench-peers: $(STAMP)
	sh bench/peers/install.sh $(BIN)/pip

clean:
	rm -rf $(VENV) var build *.egg-info
