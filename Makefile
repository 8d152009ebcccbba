# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench soak clean install bench-peers

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

# The whole loop on loopback (lab DNS, sinks, `volley serve`, blast) and a one-screen report.
.PHONY: demo
demo: $(STAMP)
	$(BIN)/volley demo

# Micro benchmarks, then the end-to-end receive and relay runners (a few minutes).
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/relay.py

# The peers of bench/run.py: Postfix (apt-get, needs root; skipped with a message
# otherwise) and aiosmtpd in the venv. Idempotent.
bench-peers: $(STAMP)
	sh bench/peers/install.sh $(BIN)/pip

clean:
	rm -rf $(VENV) var build *.egg-info
