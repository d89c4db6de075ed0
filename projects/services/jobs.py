"""Background jobs: create and queue them after commit, cancel them, fail stale ones."""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Q
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
    at its next progress report (within seconds) and ends as ``cancelled``. A running job whose
    worker is gone (no heartbeat for over ``settings.STALE_JOB_SECONDS``) is cancelled at once
    too: nothing is left to see the request, and its run can then be resumed.

    Raises NotAllowed for viewers and InvalidState for a job that has already ended."""
    ensure_can_write(user=user, team=job.team)
    if job.status in JOB_ENDED:
        raise InvalidState(f"job {job.pk} has already ended ({job.status})")
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.STALE_JOB_SECONDS)
    with transaction.atomic():  # the job's end and its subject's commit together
        n = Job.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, message="Cancelled before it started"
        )
        if not n:
            n = _stale_running(Job.objects.filter(pk=job.pk), cutoff).update(
                status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now,
                message=f"Cancelled; its worker had stopped reporting (no heartbeat for over "
                        f"{settings.STALE_JOB_SECONDS} s), so it was ended at once",
            )
        if not n:
            Job.objects.filter(pk=job.pk).exclude(status__in=JOB_ENDED).update(cancel_requested=True, message="Cancelling…")
        job.refresh_from_db()
        _notify_subject(job)
    return job


def _stale_running(qs, cutoff):
    """The running jobs of ``qs`` whose last heartbeat (or, lacking one, start) is older than
    ``cutoff``."""
    return qs.filter(status=JobStatus.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff))


def jobs_mark_stale(*, now=None, max_age_s: int | None = None) -> list[int]:
    """Fail running jobs whose heartbeat (or start) is older than ``max_age_s`` seconds
    (default ``settings.STALE_JOB_SECONDS``): their worker died. A job a user had already asked
    to cancel ends ``cancelled`` instead. The subject row (Dataset, GenerationRun, TrainingRun,
    Evaluation) ends with its job. Returns the ended job ids."""
    now = now or timezone.now()
    max_age_s = max_age_s or settings.STALE_JOB_SECONDS
    cutoff = now - timedelta(seconds=max_age_s)
    stale = list(_stale_running(Job.objects.all(), cutoff).values_list("pk", flat=True))
    lost = (f"the worker stopped reporting (no heartbeat for over {max_age_s} s); it probably crashed or "
            "was stopped")
    ended: list[int] = []
    for pk in stale:
        with transaction.atomic():  # the job's end and its subject's commit together
            still = _stale_running(Job.objects.filter(pk=pk), cutoff)
            n = still.filter(cancel_requested=True).update(
                status=JobStatus.CANCELLED, finished_at=now, message=f"Cancelled; {lost}")
            if not n:
                n = still.update(status=JobStatus.FAILED, finished_at=now, message="Worker lost",
                                 error=f"The worker stopped reporting (no heartbeat for over {max_age_s} s); it "
                                       "probably crashed or was stopped. Resume or start the job again.")
            if n:
                ended.append(pk)
                _notify_subject(Job.objects.get(pk=pk))
    return ended


# Subjects (a Dataset, GenerationRun, TrainingRun, Evaluation) mirror their job's final status
# when the job ends outside its task (cancelled while queued, cancelled or failed with its worker
# gone). ProjectsConfig.ready() fills this registry, so every process that sets Django up (the
# web app, each worker, beat, manage.py) knows every kind, whichever tasks it has run.
_SUBJECT_SYNC: dict[str, Callable[[Job], None]] = {}


def job_subject_syncs_register(*, syncs: dict[str, Callable[[Job], None]]) -> None:
    """Register, per job kind, ``fn(job)`` that updates the job's subject row once the job has
    ended (called by ``ProjectsConfig.ready()``; a kind registered again is replaced)."""
    _SUBJECT_SYNC.update(syncs)


def job_subject_syncs() -> dict[str, Callable[[Job], None]]:
    """The registered subject syncs: ``{job kind: fn(job)}`` (a copy)."""
    return dict(_SUBJECT_SYNC)


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
