"""A real Celery worker process runs jobs to their end through the Job row."""
import time

from django.db import transaction

from projects.models import Job, JobStatus
from projects.services.jobs import job_cancel, job_create, job_enqueue
from tests.conftest import wait_job
from workers.tasks import selftest_task


def _queue(team, **payload) -> Job:
    with transaction.atomic():
        job = job_create(kind="selftest", team=team, payload=payload)
        job_enqueue(job=job, task=selftest_task)
    return job


def test_worker_runs_a_job_to_succeeded(celery_worker, team):
    job = _queue(team, steps=4, sleep_s=0.1)
    job = wait_job(job.id, timeout=60)
    assert job.status == JobStatus.SUCCEEDED
    assert job.progress == 1.0
    assert job.result == {"steps": 4, "message": "Counted to 4"}
    assert job.celery_task_id
    assert job.started_at <= job.finished_at


def test_worker_records_failure(celery_worker, team):
    job = wait_job(_queue(team, steps=1, sleep_s=0, fail=True).id, timeout=60)
    assert job.status == JobStatus.FAILED
    assert "selftest asked to fail" in job.error


def test_cancel_stops_a_running_job_within_seconds(celery_worker, team):
    job = _queue(team, steps=200, sleep_s=0.1)
    deadline = time.time() + 120  # the worker may be busy on a loaded machine
    while Job.objects.get(pk=job.pk).status != JobStatus.RUNNING and time.time() < deadline:
        time.sleep(0.1)
    job_cancel(job=Job.objects.get(pk=job.pk))
    t0 = time.time()
    job = wait_job(job.id, timeout=30)
    assert job.status == JobStatus.CANCELLED
    assert time.time() - t0 < 10
    assert job.progress < 1.0
