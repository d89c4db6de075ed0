"""Login throttling (django-axes): after DISTILLHUB_LOGIN_FAILURE_LIMIT wrong passwords for one
username from one address, even the right password is refused until the cool-off passes or an
operator unlocks (``manage.py axes_reset``)."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.conftest import PASSWORD
from tests.test_settings import REPO, _load_settings

pytestmark = pytest.mark.django_db


def _login(client, username: str, password: str, addr: str = "10.0.0.7"):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=addr)


def _logged_in(client) -> bool:
    return client.get("/").status_code == 200


def test_25_wrong_passwords_then_the_right_one_is_refused_until_reset(client, owner):
    statuses = [_login(client, "olivia", f"guess-{i}").status_code for i in range(25)]
    # Four plain refusals (the login form again), then the lockout page from the fifth on.
    assert statuses[:4] == [200] * 4 and set(statuses[4:]) == {429}
    r = _login(client, "olivia", PASSWORD)
    body = r.content.decode()
    assert r.status_code == 429 and not _logged_in(client)
    # A clear page in the product's layout, not a 500 or a bare string.
    assert "<title>" in body and "Too many failed logins" in body and "15 minutes" in body
    assert 'href="/login/"' in body

    call_command("axes_reset")  # the operator's unlock
    r = _login(client, "olivia", PASSWORD)
    assert r.status_code == 302 and _logged_in(client)


def test_unlock_one_username_from_the_command_line(client, owner):
    for i in range(5):
        _login(client, "olivia", f"guess-{i}")
    assert _login(client, "olivia", PASSWORD).status_code == 429
    call_command("axes_reset_username", "olivia")
    assert _login(client, "olivia", PASSWORD).status_code == 302


def test_the_lock_is_per_username_and_address(client, owner, member):
    for i in range(5):
        _login(client, "olivia", f"guess-{i}")
    assert _login(client, "olivia", PASSWORD).status_code == 429
    # Another user from the same address, and the same user from another address, still log in.
    assert _login(client, "mark", PASSWORD).status_code == 302
    client.logout()
    assert _login(client, "olivia", PASSWORD, addr="10.0.0.8").status_code == 302


def test_fewer_failures_than_the_limit_do_not_lock_and_a_success_resets_them(client, owner):
    for _ in range(2):
        for i in range(4):
            assert _login(client, "olivia", f"guess-{i}").status_code == 200
        assert _login(client, "olivia", PASSWORD).status_code == 302
        client.logout()


def test_the_lock_ends_after_the_cool_off(client, owner):
    from axes.models import AccessAttempt

    for i in range(5):
        _login(client, "olivia", f"guess-{i}")
    assert _login(client, "olivia", PASSWORD).status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert _login(client, "olivia", PASSWORD).status_code == 302


def test_force_login_is_not_throttled(client, owner):
    for i in range(5):
        _login(client, "olivia", f"guess-{i}")
    client.force_login(owner)  # tests and trusted code bypass the password check
    assert _logged_in(client)


def test_throttle_settings_come_from_the_environment(tmp_path):
    code = ("import distillhub.settings as s; "
            "print(s.AXES_FAILURE_LIMIT, int(s.AXES_COOLOFF_TIME.total_seconds()), s.AUTHENTICATION_BACKENDS[0])")
    e = dict(DISTILLHUB_LOGIN_FAILURE_LIMIT="3", DISTILLHUB_LOGIN_COOLOFF_MINUTES="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**_env(tmp_path), **e})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "120", "axes.backends.AxesStandaloneBackend"]
    for name, value, needle in (("DISTILLHUB_LOGIN_FAILURE_LIMIT", "many", "is not an integer"),
                                ("DISTILLHUB_LOGIN_FAILURE_LIMIT", "0", "must be at least 1"),
                                ("DISTILLHUB_LOGIN_COOLOFF_MINUTES", "-5", "must be at least 1")):
        r = _load_settings(tmp_path, **{name: value})
        assert r.returncode != 0 and "ImproperlyConfigured" in r.stderr and f"{name}={value!r} {needle}" in r.stderr


def _env(tmp_path) -> dict:
    import os

    e = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL"}}
    e["DISTILLHUB_DATA_DIR"] = str(tmp_path / "data")
    return e
