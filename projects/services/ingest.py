"""Uploading query files (request side): save the file through the storage API and queue its
import after commit. The import itself (COPY, dedup, splits) and the search index run on the
worker floor, in ``workers.runs.ingest``; ``distill import`` runs it in its own process."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from projects.models import Dataset, Job, Project
from projects.services import InvalidInput
from projects.services.jobs import job_create, job_enqueue
from projects.services.permissions import ensure_can_write

JOB_KIND = "ingest"


def dataset_columns_check(*, text_column: str | None, reference_column: str | None) -> None:
    """Raise InvalidInput naming the field when a column name is over 200 characters."""
    for field, value in (("text_column", text_column), ("reference_column", reference_column)):
        if value and len(value) > 200:
            raise InvalidInput(f"{field}: at most 200 characters, got {len(value)}")


def dataset_upload(
    *,
    project: Project,
    upload: UploadedFile,
    user=None,
    text_column: str | None = None,
    reference_column: str | None = None,
    golden: bool = False,
    header: bool | None = None,
) -> Dataset:
    """Save an uploaded file through Django's default storage (streamed in chunks; Django has
    already spilled uploads over 2 MB to a temporary file) and queue its import on the
    ``default`` Celery queue (``ingest_import_task``) once this transaction commits. Returns the
    pending Dataset; its ``job`` shows the progress.

    Raises NotAllowed for viewers, InvalidInput for an empty file or one over
    ``settings.MAX_UPLOAD_MB`` megabytes."""
    ensure_can_write(user=user, team=project.team)
    dataset_columns_check(text_column=text_column, reference_column=reference_column)
    limit = settings.MAX_UPLOAD_MB * 1024 * 1024
    if upload.size is not None and upload.size > limit:
        raise InvalidInput(f"file: {upload.name} is {upload.size / 1e6:.1f} MB; the limit is {settings.MAX_UPLOAD_MB} MB")
    if not upload.size:
        raise InvalidInput(f"file: {upload.name} is empty")

    with transaction.atomic():
        job = job_create(kind=JOB_KIND, team=project.team, project=project, user=user,
                         payload={"header": header, "filename": upload.name})
        dataset = Dataset(
            project=project, name=upload.name[:255], golden=golden, text_column=text_column or "",
            reference_column=reference_column or "", job=job,
            created_by=user if (user is not None and user.is_authenticated) else None,
        )
        dataset.file.save(Path(upload.name).name or "upload", upload, save=False)
        dataset.save()
        job.payload["dataset_id"] = dataset.pk
        job.save(update_fields=["payload"])
        job_enqueue(job=job, task="workers.tasks.ingest_import_task")
    return dataset


def dataset_report(*, dataset: Dataset) -> dict:
    """The import report of ``dataset`` as the CLI prints it: ``dataset`` (id), ``file``,
    ``status``, ``imported``, ``duplicates``, ``skipped`` (list of ``{line, reason}``, at most
    10,000; ``skipped_total`` counts all), ``splits`` ({train, validation, test} counts of the
    queries this file added), ``golden`` (golden queries added), ``warnings``, ``encoding``,
    ``format``, ``text_column``, ``reference_column``, ``error``."""
    r = dataset.report or {}
    return {
        "dataset": dataset.pk, "file": dataset.name, "status": dataset.status, "imported": dataset.imported,
        "duplicates": dataset.duplicates, "skipped": dataset.skipped, "skipped_total": r.get("skipped_total", len(dataset.skipped)),
        "splits": r.get("splits", {"train": 0, "validation": 0, "test": 0}), "golden": r.get("golden", 0),
        "warnings": r.get("warnings", []), "encoding": dataset.encoding, "format": r.get("format"),
        "text_column": r.get("text_column"), "reference_column": r.get("reference_column"), "error": dataset.error,
    }


def _sync_dataset(job: Job) -> None:
    """A job that ended outside its task (cancelled while queued, worker lost) fails its
    still-pending Dataset."""
    if job.status != "succeeded":
        Dataset.objects.filter(job=job, status=Dataset.Status.PENDING).update(
            status=Dataset.Status.FAILED, error=job.error or job.message or f"import {job.status}")
