"""Celery tasks. Each is thin: claim the Job row, call the pipeline through a service, write
results, end the job. Routing by name prefix (see distillhub/celery.py): ``generation_*`` go to
the ``teacher`` queue, ``training_*`` and ``evaluation_*`` to ``gpu``, the rest to ``default``."""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from celery import shared_task

from projects.models import Job, JobStatus
from projects.services.jobs import jobs_mark_stale
from workers.progress import JobCancelled, JobReporter, job_claim, job_finish

log = logging.getLogger(__name__)


def run_job(job_id: int, body: Callable[[Job, JobReporter], dict | None], *, task_id: str = "") -> None:
    """Claim job ``job_id`` and run ``body(job, reporter)``; end the job as succeeded with the
    dict ``body`` returns as its result, cancelled on JobCancelled, failed (with the message
    and traceback tail) on any other exception. A job that is not queued is left alone."""
    job = job_claim(job_id, task_id)
    if job is None:
        log.info("job %s is not queued any more; nothing to do", job_id)
        return
    reporter = JobReporter(job.id)
    try:
        result = body(job, reporter) or {}
    except JobCancelled:
        job_finish(job.id, status=JobStatus.CANCELLED, message="Cancelled by user")
    except Exception as exc:  # noqa: BLE001 - a job records every failure for the user
        log.exception("job %s failed", job_id)
        tb = traceback.format_exc(limit=8)
        job_finish(job.id, status=JobStatus.FAILED, message=f"Failed: {exc}"[:2000], error=f"{exc}\n\n{tb}"[:20000])
    else:
        job_finish(job.id, status=JobStatus.SUCCEEDED, message=result.get("message", "Done"), result=result)
    finally:
        # Let the area's subject row (GenerationRun, TrainingRun, ...) mirror the final state.
        from projects.services.jobs import _notify_subject

        _notify_subject(Job.objects.get(pk=job_id))


@shared_task(bind=True, name="workers.tasks.selftest_task")
def selftest_task(self, job_id: int) -> None:
    """A small job that counts to ``payload["steps"]`` (default 5) with ``payload["sleep_s"]``
    seconds between steps, reporting progress: proves the worker, the queue and the Job row work."""

    def body(job: Job, reporter: JobReporter) -> dict:
        steps = int(job.payload.get("steps", 5))
        sleep_s = float(job.payload.get("sleep_s", 0.2))
        for i in range(steps):
            reporter.check_cancel()
            time.sleep(sleep_s)
            reporter.report((i + 1) / steps, f"step {i + 1}/{steps}", force=True)
        if job.payload.get("fail"):
            raise RuntimeError("selftest asked to fail")
        return {"steps": steps, "message": f"Counted to {steps}"}

    run_job(job_id, body, task_id=self.request.id or "")


@shared_task(name="workers.tasks.jobs_mark_stale_task")
def jobs_mark_stale_task() -> list[int]:
    """Periodic (beat, every 60 s): fail running jobs whose heartbeat is stale."""
    return jobs_mark_stale()


# Each area adds its tasks below, under its own heading.


# --- Ingest ---------------------------------------------------------------------------------


# --- Generation -----------------------------------------------------------------------------


# --- Review ---------------------------------------------------------------------------------


# --- Training -------------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.training_run_task", acks_late=False)
def training_run_task(self, job_id: int) -> None:
    """Train a student (gpu queue): ``projects.services.training.training_execute`` does the
    work; the job's payload names the TrainingRun and, on resume, the checkpoint. Never retried
    automatically (a failed run is resumed by a user from its last checkpoint)."""
    from projects.services.training import training_execute

    run_job(job_id, lambda job, reporter: training_execute(job=job, reporter=reporter), task_id=self.request.id or "")


def _register_training_sync() -> None:
    # Importing the service registers how a training job's end updates its TrainingRun
    # (also when beat fails a stale job in this process).
    import projects.services.training  # noqa: F401


_register_training_sync()


# --- Evaluation -----------------------------------------------------------------------------
