#!/usr/bin/env bash
# `make demo`: start the Celery workers, Celery beat and the web app in the background (leaving them
# running), then run the whole loop on the demo project (`distill demo`) and print the summary and the login.
# `make stop` (scripts/demo.sh stop) stops what this started. The Makefile has already set up the
# venv, PostgreSQL, Redis and the migrations.
#
# Environment: DISTILLHUB_BIND (default 127.0.0.1:8000) where the web app listens; DATABASE_URL,
# REDIS_URL and the other settings variables as for every command; OPENAI_API_KEY (and optionally
# OPENAI_BASE_URL, OPENAI_MODEL) to use an OpenAI-compatible teacher; DISTILLHUB_DEMO_PASSWORD to
# choose the demo user's password. Extra arguments go to `distill demo` (e.g. --rerun, --limit 100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CELERY=${CELERY:-.venv/bin/celery}
GUNICORN=${GUNICORN:-.venv/bin/gunicorn}
RUN=${DISTILLHUB_DATA_DIR:-.data}
mkdir -p "$RUN"
BIND=${DISTILLHUB_BIND:-127.0.0.1:8000}
export DISTILLHUB_URL=${DISTILLHUB_URL:-http://$BIND}

# pidfile: does it name a live process?
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_one() {  # name pidfile
  local pidfile=$2
  if alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    echo "Stopping $1 (pid $pid)…"
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$1 (pid $pid) did not stop within 30 s; killing it."
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

if [[ "${1:-}" == "stop" ]]; then
  stop_one "web app" "$RUN/web.pid"
  stop_one "Celery beat" "$RUN/beat.pid"
  stop_one "worker (default, teacher)" "$RUN/worker-default.pid"
  stop_one "worker (gpu)" "$RUN/worker-gpu.pid"
  stop_one "gateway" "$RUN/gateway.pid"
  stop_one "demo teacher server" "$RUN/teacher-server.pid"
  echo "Stopped. Data stays in PostgreSQL and $RUN/; \`make demo\` starts everything again."
  exit 0
fi

start_worker() {  # name queues pidfile logfile extra-args...
  local name=$1 queues=$2 pidfile=$3 logfile=$4; shift 4
  if alive "$pidfile"; then
    echo "Celery worker $name already running (pid $(cat "$pidfile"); log $logfile)."
    return
  fi
  rm -f "$pidfile"
  echo "Starting Celery worker $name on queues $queues (log $logfile)…"
  "$CELERY" --workdir "$PWD" -A distillhub worker -Q "$queues" -n "$name@%h" --loglevel INFO --without-gossip --without-mingle \
    --detach --pidfile "$pidfile" --logfile "$logfile" "$@"
}

# A teacher server on this machine named by OPENAI_BASE_URL (llama.cpp, Ollama, vLLM at 127.0.0.1
# or localhost) is the operator's own choice: allow exactly that host for teacher URLs, unless
# DISTILLHUB_TEACHER_URL_ALLOW is set already. Other loopback and private addresses stay refused.
if [[ -n "${OPENAI_BASE_URL:-}" && -z "${DISTILLHUB_TEACHER_URL_ALLOW:-}" ]]; then
  local_host=$("$PY" -c 'import sys, urllib.parse as u
h = (u.urlsplit(sys.argv[1]).hostname or "").lower()
print(h if h in ("localhost", "::1") or h.startswith("127.") else "")' "$OPENAI_BASE_URL" 2>/dev/null || true)
  if [[ -n "$local_host" ]]; then
    export DISTILLHUB_TEACHER_URL_ALLOW=$local_host
    echo "OPENAI_BASE_URL is on this machine: teachers may reach $local_host (DISTILLHUB_TEACHER_URL_ALLOW)."
  fi
fi

# Without an OpenAI key the demo serves its local teacher itself (`distill serve-student` at
# 127.0.0.1:TEACHER_PORT) and its deployment points the gateway at it: that loopback address must
# pass the teacher URL policy in every process that checks a deployment (the gateway, the web app,
# `distill demo-serve`), so allow exactly 127.0.0.1 unless DISTILLHUB_TEACHER_URL_ALLOW is set.
if [[ -z "${OPENAI_API_KEY:-}" && -z "${DISTILLHUB_TEACHER_URL_ALLOW:-}" ]]; then
  export DISTILLHUB_TEACHER_URL_ALLOW=127.0.0.1
  echo "The demo serves its local teacher at 127.0.0.1: deployments may reach it (DISTILLHUB_TEACHER_URL_ALLOW=127.0.0.1)."
fi

# Ingest and generation on one worker; training and evaluation on the `gpu` queue with a fresh
# process per job (so memory is given back), as on a real GPU machine.
# Two processes with one torch thread each use both cores of a small machine without
# oversubscribing them (DISTILLHUB_TORCH_THREADS, see distillhub/celery.py).
DISTILLHUB_TORCH_THREADS=${DISTILLHUB_TORCH_THREADS:-1} \
  start_worker default "default,teacher" "$RUN/worker-default.pid" "$RUN/worker-default.log" --concurrency 2
start_worker gpu "gpu" "$RUN/worker-gpu.pid" "$RUN/worker-gpu.log" --concurrency 1 --max-tasks-per-child 1

# Beat runs the periodic tasks (distillhub/settings.py CELERY_BEAT_SCHEDULE): every 60 s it fails
# jobs whose worker died (no heartbeat for DISTILLHUB_STALE_JOB_SECONDS) together with their run,
# so they can be resumed; every 5 minutes it catches up a lost search indexing.
if alive "$RUN/beat.pid"; then
  echo "Celery beat already running (pid $(cat "$RUN/beat.pid"); log $RUN/beat.log)."
else
  rm -f "$RUN/beat.pid"
  echo "Starting Celery beat: the stale-job check every 60 s (log $RUN/beat.log)…"
  "$CELERY" --workdir "$PWD" -A distillhub beat --loglevel INFO --detach --pidfile "$RUN/beat.pid" \
    --logfile "$RUN/beat.log" --schedule "$RUN/celerybeat-schedule"
fi

answers() {
  "$PY" - "$DISTILLHUB_URL/login/" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except Exception:
    sys.exit(1)
PY
}

if alive "$RUN/web.pid"; then
  echo "Web app already running (pid $(cat "$RUN/web.pid")) at $DISTILLHUB_URL."
elif answers; then
  echo "Something else already answers at $DISTILLHUB_URL; stop it or set DISTILLHUB_BIND=127.0.0.1:8001." >&2
  exit 1
else
  rm -f "$RUN/web.pid"
  echo "Starting the web app at $DISTILLHUB_URL (log $RUN/web.log)…"
  # DEBUG stays off; whitenoise serves the static files.
  "$GUNICORN" distillhub.wsgi:application --bind "$BIND" --workers 2 --threads 4 --timeout 300 \
    --daemon --pid "$RUN/web.pid" --error-logfile "$RUN/web.log" --access-logfile "$RUN/web-access.log" \
    --capture-output
fi
for _ in $(seq 60); do answers && break; sleep 0.5; done
answers || { echo "The web app does not answer at $DISTILLHUB_URL; see $RUN/web.log:" >&2; tail -n 30 "$RUN/web.log" >&2; exit 1; }

echo "Running the whole loop on the demo project (generation, two students, evaluation)…"
if ! "$PY" manage.py distill demo "$@"; then
  echo >&2
  echo "The demo stopped with an error. Worker logs: $RUN/worker-default.log, $RUN/worker-gpu.log" >&2
  echo "The web app, the workers and beat are still running at $DISTILLHUB_URL; \`make stop\` stops them." >&2
  exit 1
fi
# Ship and watch: the gateway (and, without an OpenAI key, the local teacher behind it), then a
# deployment serving the classifier student and a few requests through it.
GATEWAY_PORT=${GATEWAY_PORT:-8200}
TEACHER_PORT=${TEACHER_PORT:-8100}
start_bg() {  # name pidfile logfile command...
  local name=$1 pidfile=$2 logfile=$3; shift 3
  if alive "$pidfile"; then echo "$name already running (pid $(cat "$pidfile"))."; return; fi
  echo "Starting $name (log $logfile)…"
  nohup "$@" >"$logfile" 2>&1 &
  echo $! >"$pidfile"
}
TEACHER_URL=""
if [[ -z "${OPENAI_API_KEY:-}" ]]; then
  # The demo project's slug gets a suffix when another team already uses support-intents-demo.
  DEMO_SLUG=$("$PY" manage.py shell -v 0 -c 'from projects.cli.demo_serving import demo_project
print(demo_project().slug)' | tail -n 1)
  start_bg "demo teacher server" "$RUN/teacher-server.pid" "$RUN/teacher-server.log" \
    "$PY" manage.py distill serve-student --teacher "$DEMO_SLUG:smollm2-local" --port "$TEACHER_PORT"
  TEACHER_URL="http://127.0.0.1:$TEACHER_PORT/v1"
fi
start_bg "gateway" "$RUN/gateway.pid" "$RUN/gateway.log" "$PY" manage.py distill gateway --port "$GATEWAY_PORT"
for _ in $(seq 240); do
  "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://127.0.0.1:$GATEWAY_PORT/healthz" 2>/dev/null && break
  sleep 0.5
done
if [[ -n "$TEACHER_URL" ]]; then
  # Wait until it serves, or stop waiting when it has exited (its log then says why).
  for _ in $(seq 240); do
    grep -q "serving" "$RUN/teacher-server.log" 2>/dev/null && break
    alive "$RUN/teacher-server.pid" || { echo "The demo teacher server stopped; see $RUN/teacher-server.log:" >&2
                                         tail -n 5 "$RUN/teacher-server.log" >&2; break; }
    sleep 0.5
  done
fi
"$PY" manage.py distill demo-serve --gateway-url "http://127.0.0.1:$GATEWAY_PORT/v1" --teacher-url "$TEACHER_URL" \
  || echo "The gateway step failed; see $RUN/gateway.log" >&2

cat <<MSG

The gateway serves the demo deployment at http://127.0.0.1:$GATEWAY_PORT/v1 (OpenAI-compatible).
The dashboard keeps running at $DISTILLHUB_URL with the demo project (login above).
Logs: $RUN/web.log, $RUN/worker-default.log, $RUN/worker-gpu.log, $RUN/beat.log.
Stop the web app, the workers, beat and the gateway with:  make stop
MSG
