# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_NOW ?= 2026-11-20T10:15:00+08:00

.PHONY: demo test lint format bench replay mutate clean venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV): on Debian/Ubuntu install python3-venv (apt-get install python3-venv), then run make again."; rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) agent.py --dry-run --broker sim --brain rules --now $(DEMO_NOW)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) scripts/bench.py --naive

# One month (21 XHKG trading days) of the rules brain on the built-in simulated market, offline; scored.
replay: $(STAMP)
	$(PY) agent.py --replay 2026-09-01..2026-09-29 --brain rules --feed synthetic --json var/replay/score.json

# Mutation testing of the safety code (long; not part of `make test` or CI). MUTATE_ARGS="--only safety.py".
mutate: $(STAMP)
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache mutants
