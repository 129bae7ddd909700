# LockN Tune. `make demo` runs a real tuning run end to end; `make test` runs the test suite.
# Both set everything up first (a virtualenv in .venv with the pinned dependencies).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOME_DIR ?= $(CURDIR)/.lockn-tune

.PHONY: install system-deps demo up test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lockn-tune demo --home $(HOME_DIR)

up: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lockn-tune up --home $(HOME_DIR)

# The tests run against a real PostgreSQL server (Debian's package; the tests start a
# throwaway cluster on loopback themselves, so the package's own cluster is not created).
system-deps:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	else echo "PostgreSQL is needed for the tests: sudo apt-get install postgresql" >&2; exit 1; fi

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/orchestration_overhead.py

clean:
	rm -rf $(VENV) $(HOME_DIR)
