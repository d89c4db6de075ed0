"""Celery tasks. Each is thin: claim the Job row, call the pipeline through a service, write
results, end the job. Routing by name prefix (see distillhub/celery.py): ``generation_*`` go to
the ``teacher`` queue, ``training_*`` and ``evaluation_*`` to ``gpu``, the rest to ``default``."""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from celery import shared_task
from django.db import transaction
from django.db.models import F

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
    outcome: dict | None = None
    try:
        result = body(job, reporter) or {}
    except JobCancelled:
        outcome = {"status": JobStatus.CANCELLED, "message": "Cancelled by user"}
    except Exception as exc:  # noqa: BLE001 - a job records every failure for the user
        log.exception("job %s failed", job_id)
        tb = traceback.format_exc(limit=8)
        outcome = {"status": JobStatus.FAILED, "message": f"Failed: {exc}"[:2000], "error": f"{exc}\n\n{tb}"[:20000]}
    else:
        outcome = {"status": JobStatus.SUCCEEDED, "message": result.get("message", "Done"), "result": result}
    finally:
        from projects.services.jobs import _notify_subject

        # The job's end and its subject row (GenerationRun, TrainingRun, ...) mirroring it commit
        # together: whoever sees the job ended sees the subject ended too.
        with transaction.atomic():
            if outcome is not None:
                job_finish(job.id, **outcome)
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
    """Periodic (beat, every 60 s): fail running jobs whose heartbeat is stale, and their subject
    rows (every kind's sync is registered by ``ProjectsConfig.ready()``, whatever ran here)."""
    return jobs_mark_stale()


# Each area adds its tasks below, under its own heading.


# --- Ingest ---------------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.ingest_import_task")
def ingest_import_task(self, job_id: int) -> None:
    """Import the uploaded file of the Dataset in ``job.payload["dataset_id"]`` (one
    transaction), reporting progress as the fraction of bytes read; the job's result is the
    import report (see ``projects.services.ingest.dataset_report``)."""
    from projects.services.ingest import dataset_report
    from workers.runs.ingest import dataset_import_job

    def body(job: Job, reporter: JobReporter) -> dict:
        # The import holds its connection in one transaction and a COPY: progress and the cancel
        # flag go through a connection of their own.
        side = JobReporter(job.id, own_connection=True)

        def progress(fraction: float, message: str) -> None:
            side.report(fraction, message)
            side.check_cancel()

        try:
            dataset = dataset_import_job(job=job, progress=progress)
        finally:
            side.close()
        report = dataset_report(dataset=dataset)
        report["skipped"] = report["skipped"][:100]  # the full list stays on the Dataset
        report["message"] = (f"Imported {dataset.imported:,} queries ({dataset.duplicates:,} duplicates, "
                             f"{report['skipped_total']:,} skipped)")
        return report

    run_job(job_id, body, task_id=self.request.id or "")


@shared_task(name="workers.tasks.ingest_search_index_task")
def ingest_search_index_task(project_id: int) -> int:
    """Index the project's newly imported queries for substring search (see
    ``workers.runs.ingest.query_search_index``); returns the number added."""
    from workers.runs.ingest import query_search_index

    return query_search_index(project_id=project_id)


@shared_task(name="workers.tasks.ingest_search_catch_up_task")
def ingest_search_catch_up_task() -> list[int]:
    """Periodic (beat, every 5 minutes): index every project whose search index is behind its
    imports (its run after an import was lost); returns their ids."""
    from projects.models import Project
    from workers.runs.ingest import query_search_index

    behind = list(Project.objects.filter(search_indexed_version__lt=F("search_version")).values_list("pk", flat=True))
    for pk in behind:
        query_search_index(project_id=pk)
    return behind


# --- Generation -----------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.generation_run_task")
def generation_run_task(self, job_id: int) -> None:
    """A generation run's coordinator: queues its chunks, takes unclaimed ones, waits for the
    rest and ends the job (see workers.runs.generation)."""
    from workers.runs.generation import generation_coordinate

    run_job(job_id, lambda job, reporter: generation_coordinate(job=job, reporter=reporter), task_id=self.request.id or "")


@shared_task(name="workers.tasks.generation_chunk_task")
def generation_chunk_task(job_id: int, index: int, query_ids: list[int]) -> None:
    """One chunk of a generation run, for whichever worker takes it first (claimed once)."""
    from workers.runs.generation import generation_chunk_take

    generation_chunk_take(job_id=job_id, index=index, query_ids=query_ids)


# --- Review ---------------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.review_bulk_task")
def review_bulk_task(self, job_id: int) -> None:
    """A large bulk accept/reject (see ``projects.services.review.review_bulk_start``)."""

    def body(job: Job, reporter: JobReporter) -> dict:
        from django.contrib.auth import get_user_model

        from projects.services.review import ReviewFilters, review_bulk

        p = job.payload
        user = get_user_model().objects.filter(pk=p.get("user_id")).first() if p.get("user_id") else None
        reporter.report(0.0, f"Deciding {p['expected_count']} samples ({p['decision']})", force=True)
        n = review_bulk(project=job.project, user=user, filters=ReviewFilters.from_params(p["filters"]),
                        decision=p["decision"], expected_count=p["expected_count"])
        verb = "Accepted" if p["decision"] == "accept" else "Rejected"
        return {"decided": n, "message": f"{verb} {n} samples"}

    run_job(job_id, body, task_id=self.request.id or "")


# --- Training -------------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.training_run_task", acks_late=False)
def training_run_task(self, job_id: int) -> None:
    """Train a student (gpu queue): ``workers.runs.training.training_execute`` does the
    work; the job's payload names the TrainingRun and, on resume, the checkpoint. Never retried
    automatically (a failed run is resumed by a user from its last checkpoint)."""
    from workers.runs.training import training_execute

    run_job(job_id, lambda job, reporter: training_execute(job=job, reporter=reporter), task_id=self.request.id or "")


# --- Sweeps ---------------------------------------------------------------------------------


@shared_task(name="workers.tasks.sweep_advance_task")
def sweep_advance_task(sweep_id: int) -> dict:
    """A sweep's trial ended (default queue): tell its Optuna study the trial's value and ask
    the next trial, or end the sweep (``projects.services.sweeps.sweep_advance``; idempotent, so
    a redelivered message changes nothing)."""
    from projects.services.sweeps import sweep_advance

    return sweep_advance(sweep_id=sweep_id)


@shared_task(name="workers.tasks.sweep_catch_up_task")
def sweep_catch_up_task() -> list[int]:
    """Periodic (beat, every 5 minutes): advance every running sweep that has no active trial
    (its advance after a trial's end was lost); returns their ids."""
    from projects.services.sweeps import sweep_advance, sweeps_stalled

    stalled = sweeps_stalled()
    for pk in stalled:
        sweep_advance(sweep_id=pk)
    return stalled


# --- Evaluation -----------------------------------------------------------------------------


@shared_task(bind=True, name="workers.tasks.evaluation_task")
def evaluation_task(self, job_id: int) -> None:
    """Evaluate students against the teacher(s) (workers.runs.evaluation.evaluation_run)."""
    from workers.runs.evaluation import evaluation_run

    run_job(job_id, lambda job, reporter: evaluation_run(job=job, reporter=reporter), task_id=self.request.id or "")


# --- Serving --------------------------------------------------------------------------------


@shared_task(name="workers.tasks.serving_tick_task")
def serving_tick_task() -> dict:
    """Periodic (beat, every minute): harvest logged teacher answers into production-traffic
    runs, apply the promote rule, continuous distillation (workers.runs.serving)."""
    from workers.runs.serving import serving_tick

    return serving_tick()
