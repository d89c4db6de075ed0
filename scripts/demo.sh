#!/usr/bin/env bash
# Placeholder until the demo issue fills it: start a worker and the web app.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/celery -A distillhub worker -Q default,teacher,gpu --loglevel WARNING --detach --pidfile .data/worker.pid --logfile .data/worker.log
exec .venv/bin/python manage.py runserver 127.0.0.1:8000
