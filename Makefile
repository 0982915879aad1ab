# Targets for developers and CI. `make run` and `make test` set up everything they
# need on a fresh machine with Python 3.11+: a virtual environment in .venv with the
# package and its test dependencies.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install run test lint bench faults fuzz soak clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

## run: the gateway on the memory:// registry with a demo provider and its heartbeat agent
run: $(STAMP)
	$(BIN)/python -m proxy.demo.run

## test: the whole test suite (starts its own redis-server on a free port)
test: $(STAMP)
	$(BIN)/python -m pytest

## bench: the gateway against nginx and a direct connection; writes docs/BENCHMARKS.md
## (about 8 minutes; `make bench BENCH_ARGS=--quick` takes about 2). Needs nginx and wrk.
bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

# py-spy samples the gateway for the profile section of docs/BENCHMARKS.md.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,fast,bench]'
	touch $(BENCH_STAMP)

## faults: the fault campaign at ten times the rounds of make test (about 2 minutes)
faults: $(STAMP)
	FAULTS_SCALE=10 $(BIN)/python -m pytest tests/faults -q

## fuzz: the hypothesis fuzzers with 3,000 examples per test (about 80 seconds)
fuzz: $(STAMP)
	FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest tests/fuzz -q

## soak: ten minutes of mixed traffic on a private redis-server; exits 1 on resource growth
soak: $(STAMP)
	$(BIN)/python tests/soak/soak.py --duration-s 600

lint: $(STAMP)
	$(BIN)/ruff check proxy registry tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
