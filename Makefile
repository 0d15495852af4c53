# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slidevl-installed
NPM_STAMP := node_modules/.package-lock.json
CHROMIUM := /usr/bin/chromium
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: setup chromium demo test test-all clean

# torch and torchvision are pinned and installed first, as a matched pair: timm and
# open_clip need torchvision, and torchvision only imports beside the torch it was built
# for. The 2.14.1 builds are CUDA 13 builds that also run on the CPU, so one venv serves
# both kinds of machine; pip takes them from local disk where they lie there.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,conch,ray]'
	touch $(STAMP)

# The viewer serves OpenSeadragon from node_modules: no CDN at run time.
$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

setup: $(STAMP) $(NPM_STAMP)

# The browser test drives Debian's Chromium; installing it needs root and apt.
chromium:
	test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(VENV)/bin/slidevl demo --out $(DEMO_DIR)

# One worker per core, whole modules per worker (module fixtures are built once).
test: setup chromium
	$(VENV)/bin/pytest -q -m "not slow" -n auto --dist loadfile $(PYTEST_ARGS)

test-all: setup chromium
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache node_modules
