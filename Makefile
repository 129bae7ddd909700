# LockN Tune. `make demo` runs a real tuning run end to end; `make test` runs the test suite.
# Both set everything up first (a virtualenv in .venv with the pinned dependencies).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOME_DIR ?= $(CURDIR)/.lockn-tune

.PHONY: install demo up test bench clean

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

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/orchestration_overhead.py

clean:
	rm -rf $(VENV) $(HOME_DIR)
