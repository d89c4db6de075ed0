"""Background jobs: create and queue them after commit, cancel them, fail stale ones."""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from projects.models import JOB_ENDED, Job, JobStatus, Project, Team
from projects.services import InvalidState
from projects.services.permissions import ensure_can_write

log = logging.getLogger(__name__)


def job_create(*, kind: str, team: Team, project: Project | None = None, user=None, payload: dict | None = None) -> Job:
    """Create a queued Job row (call inside the transaction that creates its subject)."""
    return Job.objects.create(
        kind=kind,
        team=team,
        project=project,
        created_by=user if (user is not None and user.is_authenticated) else None,
        payload=payload or {},
        message="Queued",
    )


def task_send(*, name: str, args: list, queue: str | None = None) -> str:
    """Queue the Celery task registered as ``name`` (e.g. ``"workers.tasks.evaluation_task"``)
    with ``args`` by name, so the request side never imports the worker side. Without
    ``queue`` the app's routes by name prefix pick it. Returns the Celery task id."""
    options = {"queue": queue} if queue else {}
    return current_app.send_task(name, args=args, **options).id or ""


def job_enqueue(*, job: Job, task, queue: str | None = None) -> None:
    """Send the task named ``task`` (a task name such as ``"workers.tasks.training_run_task"``;
    a task object is taken by its name) with ``job.id`` once the current transaction commits,
    so the worker always finds the row. Records the Celery task id on the row."""
    name = task if isinstance(task, str) else task.name

    def send() -> None:
        task_id = task_send(name=name, args=[job.id], queue=queue)
        Job.objects.filter(pk=job.pk).update(celery_task_id=task_id)

    transaction.on_commit(send)


def job_cancel(*, job: Job, user=None) -> Job:
    """Ask a job to stop. A queued job is cancelled at once; a running one sees the request
    at its next progress report (within seconds) and ends as ``cancelled``.

    Raises NotAllowed for viewers and InvalidState for a job that has already ended."""
    ensure_can_write(user=user, team=job.team)
    if job.status in JOB_ENDED:
        raise InvalidState(f"job {job.pk} has already ended ({job.status})")
    now = timezone.now()
    with transaction.atomic():  # the job's end and its subject's commit together
        n = Job.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, message="Cancelled before it started"
        )
        if not n:
            Job.objects.filter(pk=job.pk).exclude(status__in=JOB_ENDED).update(cancel_requested=True, message="Cancelling…")
        job.refresh_from_db()
        _notify_subject(job)
    return job


def jobs_mark_stale(*, now=None, max_age_s: int | None = None) -> list[int]:
    """Fail running jobs whose heartbeat (or start) is older than ``max_age_s`` seconds
    (default ``settings.STALE_JOB_SECONDS``): their worker died. Returns the failed job ids."""
    now = now or timezone.now()
    max_age_s = max_age_s or settings.STALE_JOB_SECONDS
    cutoff = now - timedelta(seconds=max_age_s)
    stale = list(
        Job.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True)
    )
    failed: list[int] = []
    for pk in stale:
        with transaction.atomic():  # the job's end and its subject's commit together
            n = Job.objects.filter(pk=pk, status=JobStatus.RUNNING, heartbeat_at__lt=cutoff).update(
                status=JobStatus.FAILED,
                finished_at=now,
                error=f"The worker stopped reporting (no heartbeat for over {max_age_s} s); it probably crashed. "
                "Resume or start the job again.",
                message="Worker lost",
            )
            if n:
                failed.append(pk)
                _notify_subject(Job.objects.get(pk=pk))
    return failed


# Subjects (a GenerationRun, TrainingRun, ...) mirror their job's final status; each area
# registers how with `job_subject_sync`.
_SUBJECT_SYNC: dict[str, Callable[[Job], None]] = {}


def job_subject_sync(kind: str):
    """Decorator: register ``fn(job)`` to update the job's subject row when the job ends
    outside its task (cancelled while queued, failed as stale)."""

    def register(fn: Callable[[Job], None]) -> Callable[[Job], None]:
        _SUBJECT_SYNC[kind] = fn
        return fn

    return register


def _notify_subject(job: Job) -> None:
    """Run the job kind's subject sync for an ended job, in a savepoint: a sync that fails is
    logged and rolled back alone, never the job's end that the caller commits with it."""
    fn = _SUBJECT_SYNC.get(job.kind)
    if fn is not None and job.status in JOB_ENDED:
        try:
            with transaction.atomic():
                fn(job)
        except Exception:  # noqa: BLE001 - the job's own end must still commit
            log.exception("updating the subject of job %s (%s) failed", job.pk, job.kind)
