"""The `distill` command's foundation verbs, run as a user would (a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

REPO = Path(__file__).resolve().parent.parent


def distill(*args, env=None, timeout: float = 120):
    """Run ``manage.py distill ARGS`` on the test database; ``timeout`` in seconds."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    e = dict(os.environ)
    e["DATABASE_URL"] = f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{connection.settings_dict['NAME']}"
    e.update(env or {})
    r = subprocess.run([sys.executable, "manage.py", "distill", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    return r


def last_json(r) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.django_db(transaction=True)
def test_team_user_project_job_verbs(tmp_path):
    r = distill("team", "create", "Acme Support", "--json")
    assert r.returncode == 0, r.stderr
    assert last_json(r) == {"team": "acme-support", "id": last_json(r)["id"]}

    r = distill("user", "create", "alice", "--team", "acme-support", "--role", "viewer", "--password-env", "PW", "--json",
                env={"PW": "a-long-password"})
    assert r.returncode == 0, r.stderr
    assert last_json(r) == {"user": "alice", "team": "acme-support", "role": "viewer"}
    from django.contrib.auth import get_user_model

    assert get_user_model().objects.get(username="alice").check_password("a-long-password")

    labels = tmp_path / "labels.txt"
    labels.write_text("refund\nlost_card\n\ncard_arrival\n")
    r = distill("project", "create", "--team", "acme-support", "--name", "Intents", "--task-type", "classification",
                "--labels-file", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    assert out["project"] == "intents" and out["labels"] == ["refund", "lost_card", "card_arrival"]

    from projects.models import Project
    from projects.services.jobs import job_create

    job = job_create(kind="selftest", team=Project.objects.get(slug="intents").team)
    r = distill("job", str(job.pk), "--json")
    assert r.returncode == 0
    assert last_json(r)["status"] == "queued" and last_json(r)["kind"] == "selftest"
    r = distill("job", str(job.pk), "--cancel", "--json")
    assert last_json(r)["status"] == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_errors_exit_1_with_one_line_naming_the_field(tmp_path):
    r = distill("project", "create", "--team", "ghost", "--name", "X", "--task-type", "classification", "--labels", "a,b")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: --team: no team with slug 'ghost'"
    distill("team", "create", "T1")
    r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "classification", "--labels", "a")
    assert r.returncode == 1 and "labels: a classification project needs at least two distinct labels" in r.stderr
    bad_schema = tmp_path / "s.json"
    bad_schema.write_text('{"type": 12}')
    r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "extraction", "--schema-file", str(bad_schema))
    assert r.returncode == 1 and "output_schema: not a valid JSON Schema" in r.stderr
    r = distill("user", "create", "bob", "--team", "t1", "--password-env", "NOPE_NOT_SET")
    assert r.returncode == 1 and "NOPE_NOT_SET is not set" in r.stderr
    r = distill("job", "999999")
    assert r.returncode == 1 and "no job with id 999999" in r.stderr


@pytest.mark.django_db(transaction=True)
def test_usage_errors_exit_2():
    r = distill("project", "create", "--team", "x", "--name", "y", "--task-type", "poetry")
    assert r.returncode == 2
    r = distill("frobnicate")
    assert r.returncode == 2
