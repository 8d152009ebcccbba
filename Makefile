# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench soak fuzz clean install bench-peers system-deps

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

test: lint system-deps
	$(BIN)/python -m pytest -q tests

# What the fault tests need from the system: strace (the syscall-order proof of
# durability), openssl (s_client against STARTTLS), tmux (the screen of `volley ctl
# top`) and redis-server (the fleet tests of [cluster], tests/cluster). Debian's
# packages, installed when missing and we are root (CI is); otherwise those tests say
# what is missing and skip.
system-deps:
	@for tool in strace openssl tmux redis-server; do \
	  command -v $$tool >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$tool >/dev/null; \
	  else echo "system-deps: $$tool is missing (tests that need it will skip)"; fi; \
	done

# A long fuzzing round of the parsers (make test runs a short one with the same tests),
# then coverage-guided runs of each parser with atheris (libFuzzer), seeded by the corpus.
fuzz: $(STAMP)
	$(BIN)/pip install --quiet -e '.[fuzz]'
	VOLLEY_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/fuzz -p no:randomly
	for target in commands replies server; do \
	  $(BIN)/python tools/fuzz_atheris.py $$target 300000 || exit 1; \
	done

# Ten minutes of mixed load with injected faults, then a reconciliation table.
soak: $(STAMP)
	$(BIN)/python tools/soak.py

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
# a note), one table, bench/results/latest.json and its chart bench/results/bench.svg
# and .png (~17-21 min on 2 cores). The chart's matplotlib is the `bench` extra,
# installed here (and again when pyproject.toml changes), never by `make test`.
# bench/e2e.py and bench/relay.py remain as quicker developer runners.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m pytest -q bench/test_charts.py bench/test_dests.py -p no:randomly
	$(BIN)/python -m pytest -q bench --benchmark-only
	$(BIN)/python bench/run.py

# The peers of bench/run.py: Postfix (apt-get, needs root; skipped with a message
# otherwise) and aiosmtpd in the venv. Idempotent.
bench-peers: $(STAMP)
	sh bench/peers/install.sh $(BIN)/pip

clean:
	rm -rf $(VENV) var build *.egg-info
