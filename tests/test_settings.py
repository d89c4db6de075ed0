"""Settings come from the environment; a wrong value is a clear ImproperlyConfigured."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_settings(tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL"}}
    e["DISTILLHUB_DATA_DIR"] = str(tmp_path / "data")
    e.update(env)
    code = "import distillhub.settings as s; print(s.DEBUG, s.DATABASES['default']['NAME'], s.REDIS_URL, s.SECRET_KEY[:6])"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True)


def test_defaults_and_generated_secret_key_is_stable(tmp_path):
    first = _load_settings(tmp_path)
    assert first.returncode == 0, first.stderr
    debug, name, redis, key = first.stdout.split()
    assert (debug, name, redis) == ("False", "distillhub", "redis://127.0.0.1:6379/0")
    key_file = tmp_path / "data" / "secret_key"
    assert key_file.exists() and len(key_file.read_text().strip()) >= 50
    assert (key_file.stat().st_mode & 0o777) == 0o600
    second = _load_settings(tmp_path)
    assert second.stdout.split()[3] == key  # the same key on the next start


def test_env_values_are_used(tmp_path):
    r = _load_settings(tmp_path, DEBUG="1", DATABASE_URL="postgres://u:p@db.example:5433/other",
                       REDIS_URL="redis://cache:6380/2", SECRET_KEY="k" * 60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "other", "redis://cache:6380/2", "kkkkkk"]


@pytest.mark.parametrize("env,needle", [
    ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
    ({"DATABASE_URL": "mysql://root@localhost/x"}, "must be a postgres:// URL"),
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL='http://localhost:6379' must be a redis://"),
    ({"DISTILLHUB_MAX_UPLOAD_MB": "lots"}, "DISTILLHUB_MAX_UPLOAD_MB='lots' is not an integer"),
    ({"DISTILLHUB_MODEL_DIRS": "models"}, "DISTILLHUB_MODEL_DIRS: 'models' is not an absolute directory"),
    ({"DISTILLHUB_TEACHER_KEY_ENVS": "sk-abc123"}, "DISTILLHUB_TEACHER_KEY_ENVS: list variable NAMES"),
    ({"DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS": "maybe"}, "DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS='maybe' is not a boolean"),
    ({"DISTILLHUB_TEACHER_URL_ALLOW": "http://x/"}, "DISTILLHUB_TEACHER_URL_ALLOW: 'http://x/' is neither"),
])
def test_bad_values_raise_improperly_configured(tmp_path, env, needle):
    r = _load_settings(tmp_path, **env)
    assert r.returncode != 0
    assert "ImproperlyConfigured" in r.stderr
    assert needle in r.stderr
