# Two commands on a fresh machine with Python 3.11:
#   make run    create .venv, install, `qpher-proxy init` if needed, then serve on https://127.0.0.1:8443
#   make test   create .venv, install with test extras, run the boundary check and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
STATE  ?= .qpher
BIN    := $(VENV)/bin

.PHONY: run test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

run: install
	@test -f $(STATE)/config.yaml || $(BIN)/qpher-proxy init --dir $(STATE)
	$(BIN)/qpher-proxy serve --config $(STATE)/config.yaml

test: install-test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(STATE) build *.egg-info
