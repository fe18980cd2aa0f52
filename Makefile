SHELL := /bin/bash -o pipefail

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU wheel is what a machine without a GPU needs; on a CUDA machine pass TORCH=torch (or a CUDA build).
TORCH ?= torch==2.13.0
# Machines that keep a local CPU wheel of torch (as this project's CI machines do) install it from there.
TORCH_FIND_LINKS := $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,)
# Extra requirement resolved together with the project, e.g. TRANSFORMERS=transformers==5.2.0 to test the oldest
# release (one resolution: nothing a newer transformers pulls in, such as `kernels`, is left behind).
TRANSFORMERS ?=
PYTEST_ARGS ?=

.PHONY: install format style test test-core notebooks reports clean

install:
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade "pip>=25.1"
	$(PYTHON) -m pip install --quiet $(TORCH_FIND_LINKS) "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[eval]" --group dev $(if $(TRANSFORMERS),"$(TRANSFORMERS)",)
	$(PYTHON) -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

format:
	$(PYTHON) -m isort .
	$(PYTHON) -m black .

reports:
	@mkdir -p reports

style: reports
	$(PYTHON) -m flake8 . | tee reports/flake8_errors.log
	@if [ -s reports/flake8_errors.log ]; then echo "flake8 found errors"; exit 1; fi
	$(PYTHON) -m isort --check-only --diff . 
	$(PYTHON) -m black --check .
	$(PYTHON) -m mypy kvpress --check-untyped-defs | tee reports/mypy.log
	@files=$$(grep -rL --include='*.py' "SPDX-FileCopyrightText:" --exclude-dir='.*' --exclude-dir=reports --exclude-dir=build . ); \
	 if [ -n "$$files" ]; then echo "Missing SPDX header:"; echo "$$files"; exit 1; fi

test: reports
	$(PYTHON) -m pytest -n 2 --durations=15 --junitxml=reports/junit.xml $(PYTEST_ARGS) tests

test-core: reports
	$(PYTHON) -m pytest -n 2 -m core $(PYTEST_ARGS) tests

# Execute every notebook of notebooks/ (offline, CPU, the reference model); fails on any error.
NOTEBOOK_TIMEOUT ?= 300
notebooks:
	$(PYTHON) notebooks/run_all.py --timeout $(NOTEBOOK_TIMEOUT)

clean:
	rm -rf reports .pytest_cache .mypy_cache build dist
