"""The `distill` command's foundation verbs, run as a user would (a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

REPO = Path(__file__).resolve().parent.parent


def distill(*args, env=None, timeout: float = 600):
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


@pytest.mark.django_db(transaction=True)
def test_user_create_refuses_an_existing_name_unless_update():
    from django.contrib.auth import get_user_model

    from projects.models import Membership

    assert distill("team", "create", "T1").returncode == 0
    r = distill("user", "create", "alice", "--team", "t1", "--role", "owner", "--password-env", "PW",
                env={"PW": "first-password"})
    assert r.returncode == 0, r.stderr
    r = distill("user", "create", "alice", "--team", "t1", "--role", "viewer", "--password-env", "PW",
                env={"PW": "second-password"})
    assert (r.returncode, r.stderr) == (
        1, "error: username: user 'alice' already exists; pass --update to set their password and role\n")
    alice = get_user_model().objects.get(username="alice")
    assert alice.check_password("first-password") and Membership.objects.get(user=alice).role == "owner"
    r = distill("user", "create", "alice", "--team", "t1", "--role", "viewer", "--password-env", "PW", "--update", "--json",
                env={"PW": "second-password"})
    assert r.returncode == 0 and last_json(r) == {"user": "alice", "team": "t1", "role": "viewer"}
    alice.refresh_from_db()
    assert alice.check_password("second-password") and Membership.objects.get(user=alice).role == "viewer"


@pytest.mark.django_db(transaction=True)
def test_non_finite_or_huge_numbers_exit_1_with_one_line():
    distill("team", "create", "T1")
    assert distill("project", "create", "--team", "t1", "--name", "P", "--task-type", "generation").returncode == 0
    cases = {
        ("generate", "--project", "p", "--budget-usd", "nan"): "error: budget_usd: nan is not a finite number\n",
        ("generate", "--project", "p", "--budget-usd", "1e999999"): "error: budget_usd: inf is not a finite number\n",
        ("generate", "--project", "p", "--budget-usd", "1e12"): "error: budget_usd: 1000000000000.0 is too large "
                                                                "(the limit is below 100,000,000)\n",
        ("generate", "--project", "p", "--limit", "3000000000"): "error: limit: 3000000000 is outside 1-2147483647\n",
        ("teacher", "add", "--project", "p", "--name", "t", "--provider", "openai", "--model", "m", "--price-in", "inf"):
            "error: price_in_per_1m: inf is not a finite number\n",
        ("teacher", "add", "--project", "p", "--name", "t", "--provider", "openai", "--model", "m", "--price-out", "nan"):
            "error: price_out_per_1m: nan is not a finite number\n",
        ("evaluate", "--project", "p", "--price-per-hour", "inf"):
            "error: price_per_hour_usd: must be between 0 and 1000000, got inf\n",
    }
    for args, message in cases.items():
        r = distill(*args)
        assert (r.returncode, r.stderr) == (1, message), args


@pytest.mark.django_db
def test_overlong_texts_and_huge_ids_exit_1_with_one_line(tmp_path, capsys):
    from django.core.management import call_command

    def run(*args, env=None):
        with pytest.raises(SystemExit) as exc:
            call_command("distill", *args)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and len(err.splitlines()) == 1, (args, err)
        return err

    assert run("team", "create", "T" * 300) == "error: team name: at most 200 characters, got 300\n"
    call_command("distill", "team", "create", "T1")
    assert run("project", "create", "--team", "t1", "--name", "P" * 300, "--task-type", "generation") == (
        "error: name: at most 200 characters, got 300\n")
    call_command("distill", "project", "create", "--team", "t1", "--name", "P", "--task-type", "generation")
    os.environ["DH_TEST_PW"] = "a-long-password"
    assert run("user", "create", "u" * 200, "--team", "t1", "--password-env", "DH_TEST_PW") == (
        "error: username: at most 150 characters, got 200\n")
    assert run("teacher", "add", "--project", "p", "--name", "n" * 200, "--provider", "transformers") == (
        "error: name: at most 100 characters, got 200\n")
    queries = tmp_path / "q.txt"
    queries.write_text("hello\n")
    assert run("import", "--project", "p", str(queries), "--text-column", "c" * 300) == (
        "error: text_column: at most 200 characters, got 300\n")
    assert run("train", "--project", "p", "--method", "sft-lora", "--student", "s" * 400) == (
        "error: student_model: at most 300 characters, got 400\n")
    huge = "9" * 25  # past PostgreSQL's bigint
    assert run("job", huge) == f"error: job: no job with id {huge}\n"
    assert run("train-resume", huge) == f"error: train-resume: no training run with id {huge}\n"
    assert run("generate", "--project", "p", "--resume", huge) == f"error: --resume: no generation run {huge} in project p\n"
