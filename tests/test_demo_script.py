"""scripts/demo.sh (`make demo` / `make stop`): the processes it starts and stops. The workers, the
web app and `distill demo` are stand-ins here (the demo itself is tests/test_demo.py); Celery beat
is the real one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stub(path: Path, body: str) -> str:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.timeout(600)  # an upper bound for a loaded CI machine; the waits inside end early
def test_demo_starts_celery_beat_and_stop_stops_it(tmp_path):
    run = tmp_path / "data"
    calls = tmp_path / "calls.log"
    real_celery = str(Path(sys.executable).with_name("celery"))
    # Workers: recorded, not started. Beat: the real one, detached with its pidfile.
    celery = _stub(tmp_path / "celery", f'echo "celery $*" >> {calls}\n'
                                        f'if [[ " $* " == *" beat "* ]]; then exec {real_celery} "$@"; fi\n')
    py = _stub(tmp_path / "python", f'echo "python $*" >> {calls}\n')  # the web app answers; the demo succeeds
    web = subprocess.Popen(["sleep", "300"], start_new_session=True)  # stands in for the running web app
    run.mkdir()
    (run / "web.pid").write_text(str(web.pid))
    env = {**os.environ, "DISTILLHUB_DATA_DIR": str(run), "CELERY": celery, "PY": py, "GUNICORN": "/bin/false"}
    beat_pid = None
    try:
        r = subprocess.run(["bash", "scripts/demo.sh", "--limit", "5"], cwd=str(REPO), env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Starting Celery beat" in r.stdout and f"{run}/beat.log" in r.stdout
        beat_calls = [line for line in calls.read_text().splitlines() if " beat " in line]
        assert beat_calls == [f"celery --workdir {REPO} -A distillhub beat --loglevel INFO --detach --pidfile "
                              f"{run}/beat.pid --logfile {run}/beat.log --schedule {run}/celerybeat-schedule"]
        assert "python manage.py distill demo --limit 5" in calls.read_text()
        deadline = time.time() + 180  # a cold Celery import on a loaded machine; ends when beat logs it
        while time.time() < deadline and "beat: Starting..." not in ((run / "beat.log").read_text()
                                                                      if (run / "beat.log").exists() else ""):
            time.sleep(0.3)
        beat_pid = int((run / "beat.pid").read_text())
        assert _alive(beat_pid) and "beat: Starting..." in (run / "beat.log").read_text()

        r = subprocess.run(["bash", "scripts/demo.sh"], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Celery beat already running" in r.stdout  # a second `make demo`: still one beat

        r = subprocess.run(["bash", "scripts/demo.sh", "stop"], cwd=str(REPO), env=env, capture_output=True, text=True,
                           timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Stopping Celery beat (pid {beat_pid})" in r.stdout
        web.wait(timeout=30)
        deadline = time.time() + 120
        while time.time() < deadline and _alive(beat_pid):
            time.sleep(0.2)
        assert not _alive(beat_pid) and not (run / "beat.pid").exists()
    finally:
        if web.poll() is None:
            web.kill()
        if beat_pid and _alive(beat_pid):
            os.kill(beat_pid, signal.SIGKILL)
