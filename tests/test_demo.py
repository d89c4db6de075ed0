"""The demo (projects/cli/demo_loop.py, `distill demo`): its set-up, its summary and, once every
stage is merged, the whole loop on a small slice of the demo data through the real worker."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_demo_password_from_env_or_kept_in_the_data_dir(settings, tmp_path, monkeypatch):
    from projects.cli.demo_loop import demo_password

    settings.DATA_DIR = tmp_path
    monkeypatch.delenv("DISTILLHUB_DEMO_PASSWORD", raising=False)
    first = demo_password()
    assert len(first) >= 12
    assert demo_password() == first  # the same login on every run
    assert stat.S_IMODE((tmp_path / "demo_password").stat().st_mode) == 0o600
    monkeypatch.setenv("DISTILLHUB_DEMO_PASSWORD", "chosen-password-1")
    assert demo_password() == "chosen-password-1"


def test_demo_setup_is_idempotent(db, settings, tmp_path, monkeypatch):
    from projects.models import Membership, Project, Team
    from projects.cli.demo_loop import DEMO_DIR, _setup

    settings.DATA_DIR = tmp_path
    monkeypatch.delenv("DISTILLHUB_DEMO_PASSWORD", raising=False)
    lines: list[str] = []
    team, user, password, project = _setup(report=lines.append)
    team2, user2, password2, project2 = _setup(report=lines.append)
    assert (team2.pk, user2.pk, password2, project2.pk) == (team.pk, user.pk, password, project.pk)
    assert Team.objects.count() == 1 and Project.objects.count() == 1
    assert user.check_password(password)
    assert Membership.objects.get(team=team, user=user).role == "owner"
    assert project.task_type == "classification"
    assert project.labels == (DEMO_DIR / "labels.txt").read_text().split()
    assert "card_arrival" in project.instructions
    assert lines[0].startswith("Created project") and lines[1].startswith("Using project")


def test_demo_summary_speedup_and_retention(db, project):
    from projects.models import Evaluation, EvalResult
    from projects.cli.demo_loop import demo_summary, demo_summary_text

    ev = Evaluation.objects.create(project=project, status="succeeded", verdict="ready to ship")
    EvalResult.objects.create(evaluation=ev, model_name="minilm-l6 classifier-kd", role="student", quality=0.81,
                              quality_retention=0.81 / 0.9, latency_ms_p50=4.0, cost_per_1k_usd=0.001)
    EvalResult.objects.create(evaluation=ev, model_name="smollm2-local", role="teacher", quality=0.9,
                              quality_retention=1.0, latency_ms_p50=600.0, cost_per_1k_usd=0.05)
    rows = demo_summary(evaluation=ev)
    assert [r["role"] for r in rows] == ["teacher", "student"]
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == pytest.approx(150.0)
    assert rows[1]["quality_retention"] == pytest.approx(0.9)
    text = demo_summary_text(result={"summary": rows, "evaluation": {"verdict": ev.verdict}, "url": "http://x/p/y/",
                                     "login": {"username": "demo", "password": "pw-123456", "url": "http://x/"}})
    assert "150.0×" in text and "90.0%" in text and "81.0%" in text
    assert "as demo with password pw-123456" in text


def test_distill_demo_rejects_a_bad_student_option():
    r = subprocess.run([sys.executable, "manage.py", "distill", "demo", "--student", "classifier-kd"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--student 'classifier-kd': give METHOD:MODEL" in r.stderr


STAGES = ["projects.services.ingest", "projects.services.generation", "projects.services.training",
          "projects.services.evaluation"]


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in STAGES),
                    reason="needs every stage of the loop (ingest, generation, training, evaluation)")
def test_distill_demo_runs_the_loop_then_reuses_it(celery_worker, tmp_path):
    """`distill demo --json` on 24 train queries with one student, as a user runs it; a second run
    reuses every finished stage."""
    from django.conf import settings
    from django.db import connection

    from projects.models import Evaluation, GenerationRun, Job, Query, TrainingRun

    db = settings.DATABASES["default"]
    env = dict(os.environ, DISTILLHUB_DEMO_PASSWORD="demo-password-42", DISTILLHUB_DATA_DIR=str(settings.DATA_DIR),
               DATABASE_URL=f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:"
                            f"{db.get('PORT') or 5432}/{connection.settings_dict['NAME']}")
    env.pop("OPENAI_API_KEY", None)
    env.pop("DISTILLHUB_URL", None)
    cmd = [sys.executable, "manage.py", "distill", "demo", "--limit", "24", "--student", "classifier-kd:minilm-l6", "--json"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["login"] == {"username": "demo", "password": "demo-password-42", "url": "http://127.0.0.1:8000/"}
    assert out["imports"]["queries"]["imported"] == 360 and out["imports"]["golden"]["imported"] == 48
    gen = out["generation"]
    assert gen["status"] == "succeeded"
    assert gen["accepted"] + gen["rejected"] + gen["failed"] == 24
    assert [t["status"] for t in out["training"]] == ["succeeded"]
    roles = sorted(s["role"] for s in out["summary"])
    assert roles == ["student", "teacher"]
    for s in out["summary"]:
        assert 0.0 <= s["quality"] <= 1.0
    assert Query.objects.filter(golden=False).count() == 360
    assert "generation:" in r.stderr and "Summary" in r.stdout

    # Again: everything is reused, nothing new is queued.
    jobs = Job.objects.count()
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    out2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert Job.objects.count() == jobs
    assert out2["generation"]["run"] == gen["run"]
    assert out2["evaluation"]["evaluation"] == out["evaluation"]["evaluation"]
    # One teacher run over the train split (the dataset) and one over the test split, which the
    # evaluation started for the teacher's answers on held-out queries.
    assert sorted(r.options.get("split", "train") for r in GenerationRun.objects.all()) == ["test", "train"]
    assert TrainingRun.objects.count() == 1 and Evaluation.objects.count() == 1
