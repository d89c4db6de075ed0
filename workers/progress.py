"""JobReporter: how a task tells the Job row (and so the pages) how far it has got."""
from __future__ import annotations

import time

from django.utils import timezone

from projects.models import JOB_ENDED, Job, JobStatus


class JobCancelled(Exception):
    """Raised by ``JobReporter.check_cancel`` when a user asked the job to stop."""


def job_claim(job_id: int, celery_task_id: str = "") -> Job | None:
    """Claim a queued job for this worker: queued -> running in one conditional UPDATE.

    Returns the job, or None when it is not queued any more (a redelivered message, a job
    cancelled while queued, another worker got it): the caller then does nothing."""
    now = timezone.now()
    n = Job.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
        status=JobStatus.RUNNING, started_at=now, heartbeat_at=now, message="Started",
        **({"celery_task_id": celery_task_id} if celery_task_id else {}),
    )
    if not n:
        return None
    return Job.objects.select_related("project", "team").get(pk=job_id)


def job_finish(job_id: int, *, status: str, message: str = "", error: str = "", result: dict | None = None) -> None:
    """Move a running job to its final ``status`` (succeeded, failed or cancelled)."""
    assert status in JOB_ENDED, status
    fields = {"status": status, "finished_at": timezone.now(), "heartbeat_at": timezone.now()}
    if status == JobStatus.SUCCEEDED:
        fields["progress"] = 1.0
    if message:
        fields["message"] = message
    if error:
        fields["error"] = error
    if result is not None:
        fields["result"] = result
    Job.objects.filter(pk=job_id).exclude(status__in=JOB_ENDED).update(**fields)


class JobReporter:
    """Throttled progress writes, heartbeat and cancel checks for one running job.

    ``report(progress, message)`` writes at most every ``interval_s`` seconds (default 2 s), or
    at once with ``force=True``; each write also refreshes the heartbeat and reads the cancel
    flag. ``progress`` is a fraction in [0, 1]. Pass ``reporter.report`` as the pipeline's
    ``report`` callback; pipelines call ``check_cancel()`` (or read ``cancelled``) between items.
    """

    def __init__(self, job_id: int, *, interval_s: float = 2.0, own_connection: bool = False) -> None:
        """``own_connection=True``: write through a database connection of the reporter's own
        (autocommit), for a task whose connection is busy in a long transaction or a COPY (an
        import): progress is then visible at once, a Cancel is never blocked by the task's
        transaction, and the task's connection is never re-entered mid-COPY. Call ``close()``
        when done."""
        self.job_id = job_id
        self.interval_s = interval_s
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self.cancelled = False
        self._conn = None
        if own_connection:
            from django.db import DEFAULT_DB_ALIAS, connections

            self._conn = connections.create_connection(DEFAULT_DB_ALIAS)

    def close(self) -> None:
        """Close the reporter's own connection (if it has one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sql(self, sql: str, params: list):
        with self._conn.cursor() as cur:
            cur.execute(sql.format(table=Job._meta.db_table), params)
            return cur.fetchone() if cur.description else None

    def report(self, progress: float | None = None, message: str | None = None, *, force: bool = False) -> bool:
        """Record progress; returns True when the job has been asked to stop."""
        now = time.monotonic()
        if not force and now - self._last_write < self.interval_s:
            return self.cancelled
        self._last_write = now
        fields: dict = {"heartbeat_at": timezone.now()}
        if progress is not None:
            fields["progress"] = max(0.0, min(1.0, float(progress)))
        if message is not None:
            fields["message"] = message[:2000]
        if self._conn is not None:
            sets = ", ".join(f"{k} = %s" for k in fields)
            self._sql(f"UPDATE {{table}} SET {sets} WHERE id = %s AND status = %s",
                      [*fields.values(), self.job_id, JobStatus.RUNNING])
        else:
            Job.objects.filter(pk=self.job_id, status=JobStatus.RUNNING).update(**fields)
        self._refresh_cancel()
        return self.cancelled

    def heartbeat(self) -> None:
        """Refresh the heartbeat only (throttled like ``report``)."""
        self.report()

    def _refresh_cancel(self) -> None:
        self._last_cancel_check = time.monotonic()
        if self._conn is not None:
            row = self._sql("SELECT cancel_requested FROM {table} WHERE id = %s", [self.job_id])
            self.cancelled = bool(row and row[0])
        else:
            self.cancelled = bool(Job.objects.filter(pk=self.job_id, cancel_requested=True).exists())

    def check_cancel(self) -> None:
        """Raise JobCancelled if a cancel was requested (reads the DB at most every interval)."""
        if time.monotonic() - self._last_cancel_check >= self.interval_s:
            self._refresh_cancel()
        if self.cancelled:
            raise JobCancelled()


__all__ = ["JobReporter", "JobCancelled", "job_claim", "job_finish"]
