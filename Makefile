# sandboxd: `make run` starts the daemon, `make test` runs the whole suite. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-host test-cgroup2 image-debian image-data bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py proto/sandboxd/v1/sandbox.proto
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sandboxd needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(MAKE) proto
	touch $(STAMP)

# Editable installs skip build_py, so the stubs are generated here too (same command as setup.py).
proto:
	$(PY) proto/generate.py

run: install
	$(VENV)/bin/sandboxd serve

test: test-host test-cgroup2

test-host: install
	$(PY) -m pytest -q tests

test-cgroup2: install
	$(PY) tests/vm/run_cgroup2_vm.py

image-debian: install
	bash images/debian/build.sh

image-data: install
	bash images/python-data/build.sh

# Issue 10's six targets beside their references, one run (bench/targets.py --quick: a smoke run).
bench: install
	$(PY) bench/targets.py

clean:
	rm -rf $(VENV) build *.egg-info sandboxd/v1/*_pb2*.py sandboxd/v1/*_pb2*.pyi
