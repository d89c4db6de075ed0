"""Importing query files, the worker floor: one transaction per file, bulk COPY, dedup by the
unique constraint (project, golden, text_hash), deterministic splits; and the search index
filled after each import.

Parsing lives in ``workers.pipeline.ingest`` (plain Python); this module writes. The rows are
streamed with PostgreSQL ``COPY`` into a temporary table and moved into ``projects_query`` with
one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, so a duplicate (in the file or already in
the project) is stored once, and a double-clicked upload adds nothing. Called by the tasks in
``workers.tasks`` and, for an import run in the caller's process, by ``distill import``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from django.db import connection, transaction

from projects.models import Dataset, Job, Project, Split
from projects.services import InvalidInput
from projects.services.ingest import dataset_columns_check
from projects.services.jobs import task_send
from projects.services.permissions import ensure_can_write
from workers.pipeline.ingest import (
    MAX_LISTED, ColumnChoice, IngestError, SkippedRow, read_rows, sniff_file, split_for_hash, text_digest,
)


def dataset_import(
    *,
    project: Project,
    file_path: str | os.PathLike,
    filename: str,
    user=None,
    text_column: str | None = None,
    reference_column: str | None = None,
    golden: bool = False,
    header: bool | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> Dataset:
    """Import the queries in ``file_path`` (CSV / TSV, JSONL, JSON or plain text, any common
    encoding; ``filename`` gives the format by its extension) into ``project`` now, in this
    process, as ONE transaction. Returns the Dataset with its report (``imported``,
    ``duplicates``, ``skipped`` list of ``{line, reason}``, ``report["splits"]``, ...; see
    ``dataset_report``).

    ``text_column`` / ``reference_column``: a CSV header name or 1-based column number, or a
    JSON key (see ``workers.pipeline.ingest.read_rows`` for the defaults). ``golden=True``
    stores the rows as the golden set (split ``golden``), kept apart from training.
    ``header``: force the CSV header detection. ``progress(fraction, message)`` is called
    while reading.

    Raises NotAllowed for viewers; InvalidInput (naming the file and the problem) when the
    file cannot be read at all: nothing is imported and the Dataset is left ``failed``."""
    ensure_can_write(user=user, team=project.team)
    dataset_columns_check(text_column=text_column, reference_column=reference_column)
    dataset = Dataset.objects.create(
        project=project, name=filename[:255], golden=golden, text_column=text_column or "",
        reference_column=reference_column or "", created_by=user if (user is not None and user.is_authenticated) else None,
    )
    return dataset_import_run(dataset=dataset, file_path=file_path, header=header, progress=progress)


@contextmanager
def _local_copy(dataset: Dataset):
    """A local path for the dataset's stored file (the file itself on disk storage, else a
    temporary copy streamed from the storage backend)."""
    try:
        yield dataset.file.path
        return
    except NotImplementedError:
        pass
    suffix = Path(dataset.name).suffix
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        with dataset.file.open("rb") as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        yield tmp.name


def dataset_import_job(*, job: Job, progress: Callable[[float, str], None] | None = None) -> Dataset:
    """Run the import queued by ``dataset_upload`` for ``job`` (called by the Celery task).
    Raises InvalidInput when the file cannot be read (the Dataset is then ``failed``)."""
    dataset = Dataset.objects.select_related("project", "project__team").get(pk=job.payload["dataset_id"])
    with _local_copy(dataset) as path:
        return dataset_import_run(dataset=dataset, file_path=path, header=job.payload.get("header"), progress=progress)


def dataset_import_run(
    *, dataset: Dataset, file_path: str | os.PathLike, header: bool | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> Dataset:
    """Parse ``file_path`` and write its queries for an existing pending ``dataset``, in one
    transaction. Raises InvalidInput when the file cannot be read (nothing is written, the
    Dataset is marked ``failed`` with the message); re-raises anything else after marking it
    failed (a cancelled job included)."""
    project = dataset.project
    try:
        with transaction.atomic():
            _import_rows(dataset=dataset, project=project, file_path=Path(file_path), header=header, progress=progress)
    except UnicodeDecodeError as exc:
        message = f"the file is not valid {exc.encoding} text ({exc.reason} at byte {exc.start} of a read block); nothing imported"
        _mark_failed(dataset, message)
        raise InvalidInput(f"{dataset.name}: {message}") from None
    except IngestError as exc:
        _mark_failed(dataset, str(exc))
        raise InvalidInput(f"{dataset.name}: {exc}") from None
    except BaseException as exc:
        _mark_failed(dataset, f"import stopped: {exc.__class__.__name__}: {exc}")
        raise
    dataset.refresh_from_db()
    return dataset


def _mark_failed(dataset: Dataset, message: str) -> None:
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.FAILED, error=message[:5000], imported=0, duplicates=0)
    dataset.status, dataset.error = Dataset.Status.FAILED, message


#: pg_advisory_xact_lock key (with the project id): one import at a time per project.
INGEST_LOCK = 0x696E6773  # "ings"


#: pg_advisory_lock key (with the project id): one search indexer at a time per project.
SEARCH_INDEX_LOCK = 0x73726368  # "srch"


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_JSON_STRING = json.encoder.encode_basestring  # the C encoder of one str, quotes included


def _metadata_json(metadata: dict) -> str:
    """``metadata`` as JSON; a flat dict of strings (a CSV row's other columns) is written
    without the general encoder, which costs a few microseconds a row."""
    try:
        return "{" + ",".join(_JSON_STRING(k) + ":" + _JSON_STRING(v) for k, v in metadata.items()) + "}"
    except TypeError:  # a value that is not a string (JSON input)
        return _JSON(metadata)


_QUERY_COLUMNS = "project_id, dataset_id, golden, line, text, text_hash, split, reference, metadata"


#: Distinct queries an import into an empty project dedups in memory (16-byte digests, about
#: 100 MB per million) before it stages the rest of the file (see ``_import_rows``).
SEEN_LIMIT = 1_000_000


def _import_rows(*, dataset: Dataset, project: Project, file_path: Path, header, progress) -> dict:
    """Parse and write the rows (inside the caller's transaction); returns the report.

    Two ways to write, one result. When the project has no queries of this kind (golden or not)
    yet, the rows are COPYed straight into ``projects_query`` while the file is read (PostgreSQL
    stores them on the other core as Python parses), duplicates within the file being dropped
    here by their 16-byte digest prefix (after SEEN_LIMIT distinct queries, the rest of a very
    large file takes the other way, so memory stays bounded). Otherwise they go through a
    temporary table and one ``INSERT ... ON CONFLICT DO NOTHING``, so queries already in the
    project count as duplicates.
    An advisory lock keeps a second import of the same project waiting until this one commits,
    which is what makes the first check safe."""
    fmt = sniff_file(file_path, dataset.name)
    fractions = {"train": project.split_train, "validation": project.split_validation, "test": project.split_test}
    golden = dataset.golden
    skipped: list[dict] = []
    skipped_total = 0
    rows_read = 0
    columns: list[ColumnChoice] = []
    table = f"ingest_rows_{dataset.pk}"
    by_split: dict[str, int] = {}

    def on_progress(fraction: float) -> None:
        if progress is not None:
            progress(0.9 * fraction, f"Read {rows_read:,} rows")

    with connection.cursor() as cur:
        # Wait for another import of this project to commit, keeping the job's heartbeat (and
        # its Cancel) alive meanwhile.
        while True:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [INGEST_LOCK, project.pk])
            if cur.fetchone()[0]:
                break
            if progress is not None:
                progress(0.0, "Waiting for another import into this project to finish")
            time.sleep(0.5)
        cur.execute("SELECT EXISTS (SELECT 1 FROM projects_query WHERE project_id = %s AND golden = %s)", [project.pk, golden])
        direct = not cur.fetchone()[0]
        # This import's rows are the project's rows above this id (imports of a project take turns).
        cur.execute("SELECT coalesce(max(id), 0) FROM projects_query WHERE project_id = %s", [project.pk])
        before_id = cur.fetchone()[0]
        rows = iter(read_rows(file_path, fmt, text_column=dataset.text_column or None,
                              reference_column=dataset.reference_column or None, header=header,
                              on_columns=columns.append, progress=on_progress))
        ids = (project.pk, dataset.pk, golden)
        pg = cur.cursor  # the psycopg 3 cursor underneath Django's wrapper

        def copy_rows(target: str, seen: set[bytes] | None) -> bool:
            """COPY rows from ``rows`` into ``target``; with ``seen``, drop the file's duplicates
            and count the splits here, and stop (returning True) once ``seen`` holds
            SEEN_LIMIT digests, so memory stays bounded. Returns False when the file is done."""
            nonlocal rows_read, skipped_total
            with pg.copy(f"COPY {target} ({_QUERY_COLUMNS}) FROM STDIN") as copy:
                write_row = copy.write_row
                for row in rows:
                    if isinstance(row, SkippedRow):
                        skipped_total += 1
                        if len(skipped) < MAX_LISTED:
                            skipped.append({"line": row.line, "reason": row.reason})
                        continue
                    rows_read += 1
                    digest = text_digest(row.text)
                    if seen is not None:
                        key = digest[:16]
                        if key in seen:
                            continue
                        seen.add(key)
                    hexdigest = digest.hex()
                    split = Split.GOLDEN if golden else split_for_hash(hexdigest, **fractions)
                    write_row((*ids, row.line, row.text, hexdigest, split, row.reference,
                               _metadata_json(row.metadata) if row.metadata else "{}"))
                    if seen is not None:
                        by_split[split] = by_split.get(split, 0) + 1
                        if len(seen) >= SEEN_LIMIT:
                            return True
            return False

        staged = not direct
        if direct and copy_rows("projects_query", set()):
            staged = True  # a very large file: the rest goes through the staging table
        if staged:
            cur.execute(f"CREATE TEMP TABLE {table} (project_id bigint, dataset_id bigint, golden boolean, line integer, "
                        "text text, text_hash text, split text, reference text, metadata jsonb) ON COMMIT DROP")
            copy_rows(table, None)
        if rows_read == 0:
            first = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:3])
            plural = "s" if skipped_total != 1 else ""
            raise IngestError(f"no query could be read from the file ({skipped_total} row{plural} skipped: {first})")
        if progress is not None:
            progress(0.92, f"Read {rows_read:,} rows; storing")
        if staged:
            cur.execute(
                f"""WITH ins AS (
                       INSERT INTO projects_query ({_QUERY_COLUMNS})
                       SELECT {_QUERY_COLUMNS} FROM {table}
                       ON CONFLICT (project_id, golden, text_hash) DO NOTHING
                       RETURNING split)
                    SELECT split, count(*) FROM ins GROUP BY split""")
            for split, n in cur.fetchall():
                by_split[split] = by_split.get(split, 0) + n
        # A golden query that is also a train/validation/test query (or the reverse) would leak
        # the golden set into training: count the distinct ones for the report (only when the
        # project has queries of the other kind; probes go through the unique index).
        overlap = 0
        cur.execute("SELECT EXISTS (SELECT 1 FROM projects_query WHERE project_id = %s AND golden = %s)", [project.pk, not golden])
        if cur.fetchone()[0]:
            cur.execute(
                """SELECT count(*) FROM projects_query t WHERE t.project_id = %s AND t.id > %s AND EXISTS (
                     SELECT 1 FROM projects_query o WHERE o.project_id = %s AND o.golden = %s AND o.text_hash = t.text_hash)""",
                [project.pk, before_id, project.pk, not golden],
            )
            overlap = cur.fetchone()[0]
        cur.execute("UPDATE projects_project SET search_version = search_version + 1 WHERE id = %s", [project.pk])
    # robust: the import has committed; a broker that is down must not turn it into a failure
    # (the beat task ingest_search_catch_up_task indexes the project later).
    transaction.on_commit(lambda: _enqueue_search_index(project.pk), robust=True)
    imported = sum(by_split.values())
    warnings = list(fmt.warnings)
    if overlap:
        other = "train/validation/test queries" if golden else "golden set"
        warnings.append({"line": None, "reason": f"{overlap} of these queries also appear in the project's {other}"})
    choice = columns[0] if columns else None
    report = {
        "format": fmt.kind,
        "encoding": fmt.encoding,
        "size_bytes": fmt.size_bytes,
        "rows_read": rows_read,
        "splits": {s: by_split.get(s, 0) for s in ("train", "validation", "test")},
        "golden": by_split.get(Split.GOLDEN, 0),
        "skipped_total": skipped_total,
        "warnings": warnings,
        "overlap": overlap,
        "columns": choice.columns if choice else [],
        "text_column": choice.text if choice else None,
        "reference_column": choice.reference if choice else None,
        "header": choice.header if choice else None,
    }
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.IMPORTED, encoding=fmt.encoding[:50], sha256=fmt.sha256, imported=imported,
        duplicates=rows_read - imported, skipped=skipped, error="", report=report,
    )
    if progress is not None:
        progress(1.0, f"Imported {imported:,} queries ({rows_read - imported:,} duplicates, {skipped_total:,} skipped)")
    return report


def _enqueue_search_index(project_id: int) -> None:
    task_send(name="workers.tasks.ingest_search_index_task", args=[project_id])


def query_search_index(*, project_id: int, batch: int = 20_000) -> int:
    """Copy the project's queries that are not in QuerySearch yet into it, ``batch`` rows per
    transaction (a crash keeps what was committed; running it twice adds nothing), then record
    the ``search_version`` it caught up with, which switches the query list's search to the
    index. Returns the number of queries added. Called by ``ingest_search_index_task`` after
    every import; an import that commits meanwhile queues its own run."""
    with connection.cursor() as cur:
        # One indexer per project at a time: a second waits, then finds what is left, so "caught
        # up" is never recorded while rows are still being inserted by another run.
        cur.execute("SELECT pg_advisory_lock(%s, %s)", [SEARCH_INDEX_LOCK, project_id])
        try:
            version = Project.objects.filter(pk=project_id).values_list("search_version", flat=True).first()
            if version is None:
                return 0
            added = _index_batches(cur, project_id, batch)
            Project.objects.filter(pk=project_id, search_indexed_version__lt=version).update(search_indexed_version=version)
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s, %s)", [SEARCH_INDEX_LOCK, project_id])
    return added


def _index_batches(cur, project_id: int, batch: int) -> int:
    """Insert the project's unindexed queries into QuerySearch in id order, one transaction per
    ``batch``; returns how many were added."""
    added, after = 0, 0
    while True:
        with transaction.atomic():
            cur.execute(
                """WITH ins AS (
                       INSERT INTO projects_querysearch (query_id, project_id, text)
                       SELECT q.id, q.project_id, q.text FROM projects_query q
                       WHERE q.project_id = %s AND q.id > %s
                         AND NOT EXISTS (SELECT 1 FROM projects_querysearch s WHERE s.query_id = q.id)
                       ORDER BY q.id LIMIT %s
                       ON CONFLICT (query_id) DO NOTHING
                       RETURNING query_id)
                   SELECT count(*), max(query_id) FROM ins""",
                [project_id, after, batch],
            )
            n, last = cur.fetchone()
        if not n:
            return added
        added, after = added + n, last
