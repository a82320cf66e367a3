# Every target does its own set-up first: `make test` and `make demo` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install test test-all demo clean

install:
	bash launch/install.sh

test: install
	$(PY) -m pytest tests -m "not slow"

test-all: install
	$(PY) -m pytest tests

demo: install
	NP=$(NP) bash launch/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
