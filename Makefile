# One command sets everything up (make setup); one runs the tests (make test).
PYTHON ?= python3
VENV ?= .venv

.PHONY: setup test test-fast bench

# torch is installed first and pinned by constraints.txt, so that no other package can
# pull a different (multi-GB CUDA) torch build.
setup:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[eval,recover,dev]'

test:
	$(VENV)/bin/python -m pytest -q

test-fast:
	$(VENV)/bin/python -m pytest -q -m "not slow"
