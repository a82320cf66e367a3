# Every target does its own set-up first: `make test` and `make demo` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install test test-all test-docker test-gpu docs demo clean

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

# the GPU paths in one go, on a machine with a GPU: its own python3 with torch (no .venv, no
# Horovod); results in results/gpu/. Without a GPU it says why and exits 0.
PYTHON3 ?= python3
test-gpu:
	$(PYTHON3) -m benchmarks.gpu_check

# the Sphinx site (docs/), warnings as errors: a renamed function breaks the build
docs: install
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

demo: install
	NP=$(NP) bash launch/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info docs/_build
