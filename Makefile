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
	$(BIN)/lockn-tune up --home $(HOME_DIR) --allow-dir $(CURDIR)

# Debian packages the tests use: PostgreSQL's server (the tests start a throwaway cluster on
# loopback themselves), Prometheus's promtool (checks deploy/prometheus) and Chromium (a
# headless browser renders the offline API docs). Installed with
# service start-up blocked, so neither package starts a server of its own.
system-deps:
	@missing=""; \
	{ ls /usr/lib/postgresql/*/bin/pg_ctl || command -v pg_ctl; } >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "the tests need:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	echo "installing Debian packages:$$missing"; \
	mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	blocker=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; blocker=1; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	status=$$?; if [ -n "$$blocker" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$status

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/orchestration_overhead.py

clean:
	rm -rf $(VENV) $(HOME_DIR)
