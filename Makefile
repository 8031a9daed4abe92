# Two commands on a fresh machine with Python 3.11:
#   make run    create .venv, install, `qpher-proxy init` if needed, then serve on https://127.0.0.1:8443
#   make test   create .venv, install with test extras, run ruff, mypy, the boundary check and the whole
#               test suite
PYTHON ?= python3
VENV   ?= .venv
STATE  ?= .qpher
BIN    := $(VENV)/bin
# pytest-xdist: one worker per CPU (`auto`; 0 runs the suite in this process), each taking whole
# test files, so that a module's shared live gateway starts once and its tests run in the order
# they are written, as in a serial run.
PYTEST_WORKERS ?= auto
PYTEST_ARGS    ?=

.PHONY: run test test-deploy install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The package is installed in editable mode, so a change to its code needs no reinstall; only a
# change to pyproject.toml (dependencies, extras, entry points) does. Each stamp records the last
# successful install of its set; it lives inside the venv, so a new venv installs again.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The test extras include the package itself, so this install also satisfies `make run`.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	@test -f $(STATE)/config.yaml || $(BIN)/qpher-proxy init --dir $(STATE)
	$(BIN)/qpher-proxy serve --config $(STATE)/config.yaml

test: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The deployment artifacts (Dockerfile, deploy/sidecar, deploy/systemd) on a Docker engine these tests
# start themselves (root, Debian's docker.io and debootstrap; .ci/run installs them). Not part of
# `make test`: that one needs nothing but Python.
test-deploy: install-test
	QPHER_DEPLOY_TESTS=1 $(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(STATE) build *.egg-info
