#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer at DATABASE_URL / REDIS_URL (defaults: 127.0.0.1:5432
# user postgres, 127.0.0.1:6379). When nothing answers and we are root on Debian/Ubuntu, install
# and start them from Debian's packages; otherwise say exactly what to run. Then create the
# database if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/distillhub}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}

read -r PG_HOST PG_PORT PG_DB < <($PY - "$DATABASE_URL" <<'PY'
import sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 5432, (u.path or "/distillhub").lstrip("/") or "distillhub")
PY
)
read -r R_HOST R_PORT < <($PY - "$REDIS_URL" <<'PY'
import sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 6379)
PY
)

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
local_host() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }
can_install() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; }

explain() {
  cat >&2 <<MSG
$1 does not answer at $2:$3. Start it, then run the command again:
  - with Docker:  docker compose up -d postgres redis
  - on Debian/Ubuntu (as root):  apt-get install -y postgresql redis-server && service postgresql start && service redis-server start
  - or point DATABASE_URL / REDIS_URL at servers you already run.
MSG
  exit 1
}

if ! answers "$PG_HOST" "$PG_PORT"; then
  if local_host "$PG_HOST" && can_install; then
    echo "PostgreSQL is not running; installing and starting it from Debian's packages…"
    command -v pg_ctlcluster >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    # Local development set-up: trust connections from this machine only (as the README says).
    grep -q "distillhub-local-trust" "$hba" || sed -i '1i host all all 127.0.0.1/32 trust # distillhub-local-trust\nhost all all ::1/128 trust # distillhub-local-trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    for _ in $(seq 30); do answers "$PG_HOST" "$PG_PORT" && break; sleep 1; done
  fi
  answers "$PG_HOST" "$PG_PORT" || explain PostgreSQL "$PG_HOST" "$PG_PORT"
fi

if ! answers "$R_HOST" "$R_PORT"; then
  if local_host "$R_HOST" && can_install; then
    echo "Redis is not running; installing and starting it from Debian's packages…"
    command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port "$R_PORT" --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/distillhub.log
    for _ in $(seq 20); do answers "$R_HOST" "$R_PORT" && break; sleep 0.5; done
  fi
  answers "$R_HOST" "$R_PORT" || explain Redis "$R_HOST" "$R_PORT"
fi

# Create the database when missing (the test suite creates its own test_* database).
$PY - "$DATABASE_URL" <<'PY'
import sys
import dj_database_url, psycopg
from psycopg import sql
cfg = dj_database_url.parse(sys.argv[1])
kw = dict(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432, user=cfg["USER"] or "postgres", password=cfg["PASSWORD"] or None)
try:
    conn = psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **kw)
except psycopg.OperationalError as exc:
    sys.exit(f"PostgreSQL answers but refuses the connection for user {kw['user']!r}: {exc}".strip())
with conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (cfg["NAME"],)).fetchone():
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(cfg["NAME"])))
        print(f"created database {cfg['NAME']}")
PY
echo "PostgreSQL ($PG_HOST:$PG_PORT/$PG_DB) and Redis ($R_HOST:$R_PORT) are ready."
