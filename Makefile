# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
# Tests run against PostgreSQL; pytest-django creates (and drops) test_greenlight.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/greenlight
# A Redis database of their own, so a running demo worker never takes test tasks.
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
# Test processes side by side, a whole file at a time (tests/parallel.py keeps them apart); 0: the tests run in
# pytest's own process (docs/decisions.md, "make test in two processes").
TEST_PROCESSES ?= 2

.PHONY: demo test bench lint browser screenshots install install-dev sandbox clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Run the whole product on the sandbox: http://127.0.0.1:$(PORT)
demo: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py demo --port $(PORT)

## Run the test suite against PostgreSQL and Redis (after a quick lint)
test: install-dev lint browser
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

## Refresh the README's screenshots (the browser tests, writing to docs/screenshots/)
screenshots: install-dev browser
	SCREENSHOTS=$(CURDIR)/docs/screenshots DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} $(BIN)/python -m pytest tests/test_browser.py tests/test_sandbox_inbox.py tests/test_a11y.py -k "clicked_through or in_a_browser or folds_behind_a_menu"

## Measure the whole pipeline on the sandbox: prints one table, writes it to var/bench.json (about 10 minutes)
bench: install-dev
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} REDIS_URL=$${REDIS_URL:-$(TEST_REDIS_URL)} $(BIN)/python -m pytest benchmarks -q -p no:cacheprovider

## The browser tests drive Debian's Chromium (or $$CHROMIUM); installed here when we may
browser:
	@test -n "$$CHROMIUM" || command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make test needs Chromium: sudo apt-get install chromium (or set CHROMIUM=/path/to/chromium)"; exit 1; fi; }

## Undefined names, unused imports, syntax errors
lint: install-dev
	$(BIN)/ruff check --select F,E9 deployer releases tests benchmarks

## Only the sandbox (AWS endpoint, SSH hosts, load balancer)
sandbox: install
	$(BIN)/python manage.py sandbox

clean:
	rm -rf $(VENV) var .pytest_cache
