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
