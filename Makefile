# headshot-gateway: a handful of verbs. Everything installs from the locks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test test-fast lint openapi bench screenshots lock install install-dev browser clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.lock pyproject.toml | $(VENV)/bin/python
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	touch $@

# The Python client (clients/python) too: its tests run against this gateway. Its own
# dependencies (httpx, standardwebhooks) are the gateway's, pinned in the locks.
$(VENV)/.dev: requirements-dev.lock clients/python/pyproject.toml $(VENV)/.runtime
	$(PIP) install -r requirements-dev.lock
	$(PIP) install --no-deps -e clients/python
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

## make run: SQLite + the simulator + the gateway on loopback; prints a key and a curl line
run: install
	$(VENV)/bin/headshot-gateway dev

# The console's browser tests drive Debian's chromium (never a downloaded browser build).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the console's browser tests"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

## make test: every test, SQLite and (when reachable) PostgreSQL; installs what they need
test: install-dev browser
	$(PY) -m pytest -q -n 4 --dist loadfile

lint: install-dev
	$(VENV)/bin/ruff check app tests bench migrations clients/python
	$(VENV)/bin/ruff format --check app tests bench migrations clients/python
	$(VENV)/bin/mypy --strict app
	$(VENV)/bin/mypy bench
	$(VENV)/bin/mypy --strict clients/python/headshot_client

openapi: install
	$(VENV)/bin/headshot-gateway openapi --output openapi/openapi.json

bench: install-dev
	$(PY) -m bench

## make screenshots: the console's pages from a real run, into docs/screenshots/
screenshots: install-dev
	$(PY) -m tests.screenshots

## make lock: re-resolve the locks from pyproject.toml in a throwaway venv
lock:
	rm -rf /tmp/hgw-lock && $(PYTHON) -m venv /tmp/hgw-lock
	/tmp/hgw-lock/bin/pip install -q --upgrade pip setuptools wheel
	/tmp/hgw-lock/bin/pip install -q .
	/tmp/hgw-lock/bin/pip freeze --exclude headshot-gateway --exclude pip > requirements.lock
	/tmp/hgw-lock/bin/pip install -q '.[test]'
	/tmp/hgw-lock/bin/pip freeze --exclude headshot-gateway --exclude pip > requirements-dev.lock
	rm -rf /tmp/hgw-lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
