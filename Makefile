# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slidevl-installed
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

# torch is pinned and installed first: pip then takes the CPU build from local disk
# instead of resolving a multi-GB CUDA build for the package's torch requirement.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/slidevl demo --out $(DEMO_DIR)

test: setup
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
