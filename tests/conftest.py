"""Shared fixtures: real PostgreSQL (pytest-django's test database), real Redis and a real
Celery worker process consuming the `default`, `teacher` and `gpu` queues.

Tests that need the worker must use ``transactional_db`` (``@pytest.mark.django_db(transaction=True)``)
so the worker, in another process, sees their rows."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The tests' OpenAI-compatible servers listen on loopback (tests/openai_stub.py, llama.cpp's
# server), which teachers may reach only where the operator allows private addresses. Django's
# settings are loaded before this file, so the setting is turned on both here (the test process)
# and in the environment (the pipeline's default policy, `distill` subprocesses, the worker).
# tests/test_security.py turns it off where it checks the refusal.
os.environ["DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS"] = "1"
from django.conf import settings as _settings  # noqa: E402

_settings.ALLOW_PRIVATE_TEACHER_URLS = True
SHARED_DATA = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))
PASSWORD = "correct-horse-42"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public datasets beside the checkout (../shared/data)."""
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the public datasets from ../shared/data "
                    "(or set DISTILLHUB_SHARED_DATA)")
    return SHARED_DATA


SKIP_BROWSER_ENV = "DISTILLHUB_SKIP_BROWSER_TESTS"
SKIP_BROWSER_WARNING = (f"WARNING: {SKIP_BROWSER_ENV}=1: the browser tests (real pages in headless Chromium) are "
                        "SKIPPED. Never set it in CI; unset it to run them.")


def chromium_executable() -> str:
    """The Chromium the browser tests drive: ``DISTILLHUB_CHROMIUM``, else ``chromium`` (or
    ``chromium-browser``) on PATH. A missing one FAILS the calling test with how to install it
    (`make test` installs it as root through scripts/browser.sh), so the browser tests never
    vanish silently. ``DISTILLHUB_SKIP_BROWSER_TESTS=1`` (a developer's machine only; CI never
    sets it) skips them instead, with a warning in the test report."""
    if os.environ.get(SKIP_BROWSER_ENV) == "1":
        pytest.skip(SKIP_BROWSER_WARNING)
    path = os.environ.get("DISTILLHUB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"Chromium is missing ({path or 'no chromium on PATH'}), so the browser tests cannot run: install it "
                    "with `sudo apt-get install chromium` (`make test` does as root), or set DISTILLHUB_CHROMIUM to a "
                    f"Chromium binary. On a developer's machine only, {SKIP_BROWSER_ENV}=1 skips them.", pytrace=False)
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of the Chromium binary for Playwright (see ``chromium_executable``)."""
    return chromium_executable()


def pytest_report_header(config):
    if os.environ.get(SKIP_BROWSER_ENV) == "1":
        return SKIP_BROWSER_WARNING


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get(SKIP_BROWSER_ENV) == "1":
        terminalreporter.write_sep("!", SKIP_BROWSER_WARNING, red=True, bold=True)


@pytest.fixture
def team(db):
    from projects.services.teams import team_create

    return team_create(name="Acme Support")


@pytest.fixture
def other_team(db):
    from projects.services.teams import team_create

    return team_create(name="Rival Corp")


def _user(team, name, role):
    from projects.services.teams import user_create

    return user_create(username=name, team=team, role=role, password=PASSWORD)


@pytest.fixture
def owner(team):
    return _user(team, "olivia", "owner")


@pytest.fixture
def member(team):
    return _user(team, "mark", "member")


@pytest.fixture
def viewer(team):
    return _user(team, "vera", "viewer")


@pytest.fixture
def outsider(other_team):
    return _user(other_team, "oscar", "owner")


@pytest.fixture
def project(team, owner):
    from projects.services.projects import project_create

    return project_create(team=team, user=owner, name="Support intents", task_type="classification",
                          labels=["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"],
                          instructions="Classify the customer's message into one intent.")


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


def _redis_url_for_tests() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def celery_worker_proc(django_db_setup, django_db_blocker):
    """A real Celery worker (a separate process) on the test database and the configured Redis.
    Session-scoped: started once, killed at the end. Queues are purged first."""
    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    test_name = connection.settings_dict["NAME"]
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    pw = db.get("PASSWORD") or ""
    auth = f"{user}:{pw}@" if pw else f"{user}@"
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{auth}{host}:{port}/{test_name}"
    env["REDIS_URL"] = _redis_url_for_tests()
    env["DISTILLHUB_DATA_DIR"] = str(settings.DATA_DIR)
    env["DISTILLHUB_MODEL_CACHE"] = str(settings.MODEL_CACHE_DIR)
    env["DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS"] = "1"  # the loopback test servers (see the top)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = Path(settings.DATA_DIR) / "test-celery-worker.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "distillhub", "worker", "-Q", "default,teacher,gpu",
         "--concurrency", "2", "--pool", "prefork", "--loglevel", "INFO", "--purge", "--without-gossip",
         "--without-mingle", "--hostname", f"test-{os.getpid()}@%h"],
        cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    # Generous: importing Django, Celery and the task modules cold on a loaded 2-core CI machine
    # can take a minute; the wait ends as soon as the worker says "ready.".
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited early; see {log_path}:\n{log_path.read_text()[-3000:]}")
        if "ready." in log_path.read_text():
            break
        time.sleep(0.3)
    else:
        raise RuntimeError(f"celery worker did not become ready; see {log_path}")
    proc.log_path = log_path
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def celery_worker(celery_worker_proc, transactional_db):
    """Use in tests that queue work: a running worker plus a transactional database."""
    return celery_worker_proc


def wait_job(job_id: int, timeout: float = 120.0):
    """Poll the Job row until it ends; returns it. Fails the test on timeout."""
    from projects.models import Job

    deadline = time.time() + timeout
    while time.time() < deadline:
        job = Job.objects.get(pk=job_id)
        if job.ended:
            return job
        time.sleep(0.25)
    job = Job.objects.get(pk=job_id)
    pytest.fail(f"job {job_id} did not end within {timeout}s: status={job.status} message={job.message!r}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """The environment a child process needs to use the test database (and the test Redis)."""
    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    auth = f"{db.get('USER') or 'postgres'}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{db.get('USER') or 'postgres'}@"
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{connection.settings_dict['NAME']}"
    env["REDIS_URL"] = _redis_url_for_tests()
    env["DISTILLHUB_DATA_DIR"] = str(settings.DATA_DIR)
    env["DISTILLHUB_MODEL_CACHE"] = str(settings.MODEL_CACHE_DIR)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(scope="session")
def gateway_proc(django_db_setup, django_db_blocker):
    """The real gateway (uvicorn, a separate process) on the test database, refreshing its keys
    and deployments every 0.3 s and flushing request logs every 0.2 s. ``proc.base_url`` ends in
    ``/v1``. Tests using it need ``transactional_db`` so the gateway sees their rows."""
    import urllib.request

    from django.conf import settings

    port = free_port()
    env = child_env()
    # A student (SmolLM2 served on CPU) may take minutes on a loaded CI machine: the tests check
    # routes, not speed, so the gateway waits for it instead of falling back after 60 s.
    env.update(GATEWAY_REFRESH_S="0.3", GATEWAY_FLUSH_S="0.2", OPENAI_API_KEY="sk-test-teacher",
               GATEWAY_STUDENT_TIMEOUT_S="600")
    log_path = Path(settings.DATA_DIR) / "test-gateway.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:app", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=str(REPO), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240  # generous for a cold start on a loaded machine; ends when /healthz answers
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read()
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
    proc.base_url = f"http://127.0.0.1:{port}/v1"
    proc.log_path = log_path
    yield proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def gateway(gateway_proc, transactional_db):
    return gateway_proc
