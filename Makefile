# Every target does its own set-up first: `make test` and `make demo` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install test test-all test-docker demo clean

install:
	bash launch/install.sh

test: install
	$(PY) -m pytest tests -m "not slow"

test-all: install
	$(PY) -m pytest tests -m "not docker"

# the CPU image built from a clean cache and run (root; installs buildah and debootstrap)
test-docker:
	INSTALL_IMAGE_TOOLS=1 bash launch/install.sh
	$(PY) -m pytest tests -m docker -s

demo: install
	NP=$(NP) bash launch/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
