"""Job rows: claiming, throttled progress, cancel requests and stale heartbeats."""
from datetime import timedelta

import pytest
from django.utils import timezone

from projects.models import Job, JobStatus
from projects.services import InvalidState, NotAllowed
from projects.services.jobs import job_cancel, job_create, jobs_mark_stale
from workers.progress import JobCancelled, JobReporter, job_claim, job_finish


@pytest.fixture
def job(team):
    return job_create(kind="selftest", team=team, payload={"steps": 3})


def test_claim_is_conditional(job):
    claimed = job_claim(job.id)
    assert claimed is not None and claimed.status == JobStatus.RUNNING and claimed.started_at is not None
    assert job_claim(job.id) is None  # a redelivered message does nothing


def test_reporter_throttles_writes(job):
    job_claim(job.id)
    r = JobReporter(job.id, interval_s=60)
    r.report(0.25, "first")
    r.report(0.5, "second")  # within the interval: not written
    job.refresh_from_db()
    assert (job.progress, job.message) == (0.25, "first")
    r.report(0.75, "forced", force=True)
    job.refresh_from_db()
    assert (job.progress, job.message) == (0.75, "forced")
    r.report(7, "clamped", force=True)
    job.refresh_from_db()
    assert job.progress == 1.0


def test_cancel_queued_job_ends_it_at_once(job, owner):
    job_cancel(job=job, user=owner)
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert job_claim(job.id) is None
    with pytest.raises(InvalidState):
        job_cancel(job=job, user=owner)


def test_cancel_running_job_is_seen_by_reporter(job, member):
    job_claim(job.id)
    r = JobReporter(job.id, interval_s=0)
    r.check_cancel()  # no request yet: no exception
    job_cancel(job=job, user=member)
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING and job.cancel_requested
    with pytest.raises(JobCancelled):
        r.check_cancel()


def test_viewer_cannot_cancel(job, viewer):
    with pytest.raises(NotAllowed):
        job_cancel(job=job, user=viewer)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED and not job.cancel_requested


def test_stale_jobs_are_failed(team):
    fresh = job_create(kind="selftest", team=team)
    stale = job_create(kind="selftest", team=team)
    job_claim(fresh.id)
    job_claim(stale.id)
    Job.objects.filter(pk=stale.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=900))
    assert jobs_mark_stale(max_age_s=600) == [stale.pk]
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == JobStatus.FAILED and "no heartbeat for over 600 s" in stale.error
    assert fresh.status == JobStatus.RUNNING


def test_finish_does_not_overwrite_an_ended_job(job):
    job_claim(job.id)
    job_finish(job.id, status=JobStatus.CANCELLED, message="stopped")
    job_finish(job.id, status=JobStatus.SUCCEEDED, message="late")
    job.refresh_from_db()
    assert (job.status, job.message) == (JobStatus.CANCELLED, "stopped")


def test_a_failing_subject_sync_never_keeps_the_job_from_ending(job, owner, monkeypatch):
    from projects.services import jobs

    def broken(job):
        raise RuntimeError("subject row gone")

    monkeypatch.setitem(jobs._SUBJECT_SYNC, "selftest", broken)
    ended = job_cancel(job=job, user=owner)
    assert ended.status == JobStatus.CANCELLED
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_reporter_with_its_own_connection_reports_from_inside_a_copy(team):
    from django.db import connection, transaction

    job = job_create(kind="selftest", team=team)
    job_claim(job.id)
    side = JobReporter(job.id, interval_s=0.0, own_connection=True)
    try:
        with transaction.atomic(), connection.cursor() as cur:  # an import: one transaction, a COPY
            cur.execute("CREATE TEMP TABLE side_copy (x integer) ON COMMIT DROP")
            with cur.cursor.copy("COPY side_copy (x) FROM STDIN") as copy:
                copy.write_row((1,))
                side.report(0.5, "half way")  # on the task's own connection this would hang
                copy.write_row((2,))
            # Committed by the reporter's connection: visible while the import's transaction is open.
            assert Job.objects.values_list("progress", "message").get(pk=job.pk) == (0.5, "half way")
        Job.objects.filter(pk=job.pk).update(cancel_requested=True)  # a user clicks Cancel
        with pytest.raises(JobCancelled):
            side.check_cancel()
    finally:
        side.close()


# --- a worker that died: the stale check and Cancel end the job and its subject row -----------

LONG_AGO = timedelta(days=1)


def _running_job(project, kind: str, payload: dict | None = None, *, age: timedelta = LONG_AGO) -> Job:
    """A job some worker claimed and then stopped heart-beating ``age`` ago (it died)."""
    then = timezone.now() - age
    return Job.objects.create(team=project.team, project=project, kind=kind, status=JobStatus.RUNNING,
                              payload=payload or {}, started_at=then, heartbeat_at=then, message="Working")


def _fresh_process_env() -> dict:
    """Environment for a fresh Python process on this test database."""
    import os

    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    auth = f"{db.get('USER') or 'postgres'}" + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "distillhub.settings",
            "DATABASE_URL": f"postgres://{auth}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/"
                            f"{connection.settings_dict['NAME']}"}


def _stale_jobs_of_every_kind(project) -> dict:
    """A job of every kind whose worker died, each with the row it works on, plus a live job."""
    from projects.models import Dataset, Evaluation, GenerationRun, TrainingRun

    ingest = _running_job(project, "ingest")
    dataset = Dataset.objects.create(project=project, name="queries.csv", job=ingest)
    ingest.payload = {"dataset_id": dataset.pk}
    ingest.save(update_fields=["payload"])
    gen = _running_job(project, "generation")
    train = _running_job(project, "training")
    evaluation = _running_job(project, "evaluation")
    alive = _running_job(project, "evaluation", age=timedelta(seconds=5))  # a live worker's job stays
    return {
        "jobs": [ingest, gen, train, evaluation,
                 _running_job(project, "review_bulk", {"decision": "accept", "expected_count": 3, "filters": {}})],
        "dataset": dataset,
        "run": GenerationRun.objects.create(project=project, job=gen, status=JobStatus.RUNNING, options={"queries": 3}),
        "trun": TrainingRun.objects.create(project=project, job=train, method="sft-lora",
                                           student_model="smollm2-135m-instruct", status=JobStatus.RUNNING),
        "ev": Evaluation.objects.create(project=project, job=evaluation, status=JobStatus.RUNNING),
        "alive": alive,
        "alive_ev": Evaluation.objects.create(project=project, job=alive, status=JobStatus.RUNNING),
    }


def _wait_ended(jobs: list[Job], timeout: float = 90.0) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and Job.objects.filter(pk__in=[j.pk for j in jobs], status=JobStatus.RUNNING).exists():
        time.sleep(0.25)


def _assert_failed_with_their_subject(rows: dict) -> None:
    """Every stale job failed saying its worker stopped reporting, and so did its subject row."""
    from projects.models import Dataset

    for job in rows["jobs"]:
        job.refresh_from_db()
        assert (job.status, job.message) == (JobStatus.FAILED, "Worker lost"), job.kind
        assert job.error.startswith("The worker stopped reporting (no heartbeat for over "), job.kind
    ingest, gen, train, evaluation, _bulk = rows["jobs"]
    dataset, run, trun, ev = rows["dataset"], rows["run"], rows["trun"], rows["ev"]
    for row in (dataset, run, trun, ev):
        row.refresh_from_db()
    assert dataset.status == Dataset.Status.FAILED and dataset.error == ingest.error
    assert (run.status, run.stop_reason, run.finished_at) == (JobStatus.FAILED, "Worker lost", gen.finished_at)
    assert (trun.status, trun.finished_at) == (JobStatus.FAILED, train.finished_at)
    assert trun.stop_reason.startswith("The worker stopped reporting (no heartbeat for over ")
    assert (ev.status, ev.finished_at) == (JobStatus.FAILED, evaluation.finished_at)
    alive, alive_ev = rows["alive"], rows["alive_ev"]
    alive.refresh_from_db()
    alive_ev.refresh_from_db()
    assert (alive.status, alive_ev.status) == (JobStatus.RUNNING, JobStatus.RUNNING)


@pytest.mark.django_db(transaction=True)
def test_stale_check_in_a_fresh_process_fails_every_kind_with_its_subject(project):
    """A process that has only set Django up (no service module imported, no task run) knows
    every kind's subject: ProjectsConfig.ready() registers them."""
    import subprocess
    import sys

    from tests.conftest import REPO

    rows = _stale_jobs_of_every_kind(project)
    code = ("import json, django; django.setup(); from projects.services.jobs import jobs_mark_stale; "
            "print(json.dumps(sorted(jobs_mark_stale())))")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=_fresh_process_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(sorted(j.pk for j in rows["jobs"]))
    _assert_failed_with_their_subject(rows)


@pytest.mark.timeout(180)
def test_beat_task_in_the_worker_fails_stale_jobs_of_every_kind_with_their_subject(celery_worker, project):
    """Beat's task, sent to the real worker as beat sends it."""
    from distillhub.celery import app

    rows = _stale_jobs_of_every_kind(project)
    app.send_task("workers.tasks.jobs_mark_stale_task")
    _wait_ended(rows["jobs"])
    _assert_failed_with_their_subject(rows)


def test_stale_job_with_a_cancel_request_ends_cancelled(project):
    from projects.models import Evaluation

    job = _running_job(project, "evaluation")
    ev = Evaluation.objects.create(project=project, job=job, status=JobStatus.RUNNING)
    Job.objects.filter(pk=job.pk).update(cancel_requested=True)  # the user clicked Cancel, then the worker died
    assert jobs_mark_stale() == [job.pk]
    job.refresh_from_db()
    ev.refresh_from_db()
    assert (job.status, ev.status) == (JobStatus.CANCELLED, JobStatus.CANCELLED)
    assert job.message.startswith("Cancelled; the worker stopped reporting (no heartbeat for over ")


def test_cancel_of_a_training_job_whose_worker_died_ends_it_at_once_and_resume_works(project, owner, settings, tmp_path):
    from projects.models import TrainingRun
    from projects.services.training import run_checkpoint_dir, training_cancel, training_resume

    settings.DATA_DIR = tmp_path
    job = _running_job(project, "training")
    run = TrainingRun.objects.create(project=project, job=job, method="sft-lora", student_model="smollm2-135m-instruct",
                                     status=JobStatus.RUNNING)
    (run_checkpoint_dir(run=run) / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(InvalidState, match="still running"):
        training_resume(run=run, user=owner)  # a dead worker's run: cancel it first

    run = training_cancel(run=run, user=owner)
    job.refresh_from_db()
    assert (job.status, run.status, run.stop_reason) == (JobStatus.CANCELLED, JobStatus.CANCELLED, "cancelled by user")
    assert "its worker had stopped reporting" in job.message and job.finished_at is not None

    run = training_resume(run=run, user=owner)
    assert run.status == JobStatus.QUEUED and run.job_id != job.pk
    assert run.job.status == JobStatus.QUEUED and run.job.payload["resume_from_checkpoint"].endswith("checkpoint-4")


def test_cancel_of_a_generation_job_whose_worker_died_ends_it_at_once_and_resume_works(project, owner):
    from projects.models import GenerationRun, Teacher
    from projects.services.generation import generation_cancel, generation_resume
    from tests.generation_fixtures import add_queries

    add_queries(project, [("Where is my new card?", "card_arrival"), ("My card was stolen", "lost_or_stolen_card")])
    teacher = Teacher.objects.create(project=project, name="api", provider="openai", model="m",
                                     base_url="http://127.0.0.1:9/v1")
    job = _running_job(project, "generation")
    run = GenerationRun.objects.create(project=project, job=job, status=JobStatus.RUNNING, options={"queries": 2})
    run.teachers.set([teacher])
    with pytest.raises(InvalidState, match="still running"):
        generation_resume(run=run, user=owner)

    run = generation_cancel(run=run, user=owner)
    job.refresh_from_db()
    assert (job.status, run.status, run.stop_reason) == (JobStatus.CANCELLED, JobStatus.CANCELLED, "cancelled by user")

    run = generation_resume(run=run, user=owner)
    assert run.status == JobStatus.QUEUED and run.job_id != job.pk and run.job.status == JobStatus.QUEUED


def test_cancel_of_a_job_whose_worker_is_alive_waits_for_the_worker(project, owner):
    job = _running_job(project, "evaluation", age=timedelta(seconds=5))
    job_cancel(job=job, user=owner)
    job.refresh_from_db()
    assert (job.status, job.cancel_requested, job.message) == (JobStatus.RUNNING, True, "Cancelling…")
