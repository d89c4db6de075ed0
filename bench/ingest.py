"""Benchmark: importing a query CSV, against PostgreSQL's own COPY of the same rows.

Writes a CSV of N rows (default 100,000; ``--quick`` 20,000) built from BANKING77 sentences
(made unique by a row number, with a label and a channel column), then times:

- ``dataset_import`` (the service behind the Queries page and ``distill import``) into a new
  project: encoding detection, parsing, normalisation, hashing, in-file dedup, splits and a COPY
  straight into the indexed query table, in one transaction;
- ``COPY bare FROM STDIN (FORMAT csv, HEADER)`` of the same file into a bare table with the
  same columns and no index (the floor: PostgreSQL parsing and storing the rows itself);
- ``copy_indexed_s``: COPY of the rows the import wrote (all their columns, as text) into a table
  made ``LIKE projects_query INCLUDING ALL`` (its primary key, unique constraint and indexes):
  the floor for any importer that keeps the query table's unique constraint and indexes;
- ``search_index_s``: the search indexer that runs after the import commits (a Celery task in
  the app; here called directly): copying the rows into the trigram-indexed QuerySearch table.

Prints the figures and, as its last line, one JSON object with ``rows``, ``import_s``,
``copy_s``, ``rows_per_s`` (import) and ``ratio_vs_copy`` (import time / COPY time), plus
``peak_rss_mb`` of this process (flat in the number of rows: the file is streamed). The best of ``--repeat`` runs (default 3) is kept for each.
Needs DATABASE_URL / REDIS_URL like the app; uses a scratch team and project it deletes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")


def make_csv(path: Path, rows: int) -> None:
    shared = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))
    source = shared / "banking77" / "train.csv"
    with open(source, newline="", encoding="utf-8") as f:
        base = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "channel"])
        for i in range(rows):
            text, label = base[i % len(base)]
            w.writerow([f"{text} (ticket {i})", label, ("web", "app", "sms")[i % 3]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 rows, one run each")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    rows = args.rows or (20_000 if args.quick else 100_000)
    repeat = args.repeat or (1 if args.quick else 3)

    import django

    django.setup()
    from django.db import connection, transaction

    from projects.models import Team
    from workers.runs.ingest import dataset_import, query_search_index
    from projects.services.projects import project_create
    from projects.services.teams import team_create

    tmpdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    path = tmpdir / "queries.csv"
    make_csv(path, rows)
    size_mb = path.stat().st_size / 1e6
    print(f"{rows:,} rows, {size_mb:.1f} MB CSV at {path}")

    team = team_create(name=f"bench ingest {int(time.time())}")
    import_times, copy_times, search_times, indexed_times = [], [], [], []
    try:
        for i in range(repeat):
            project = project_create(team=team, name=f"bench ingest {i}", task_type="generation")
            t0 = time.perf_counter()
            ds = dataset_import(project=project, file_path=path, filename=path.name)
            import_times.append(time.perf_counter() - t0)
            assert ds.imported == rows, (ds.imported, ds.duplicates, ds.skipped[:3])
            print(f"  import run {i + 1}: {import_times[-1]:.2f} s ({ds.imported:,} queries)")
            t0 = time.perf_counter()
            query_search_index(project_id=project.pk)
            search_times.append(time.perf_counter() - t0)
            print(f"  search index run {i + 1}: {search_times[-1]:.2f} s (after the import, in the background)")

            rows_file = tmpdir / "rows.txt"
            columns = "project_id, dataset_id, golden, line, text, text_hash, split, reference, metadata, created_at"
            with connection.cursor() as cur:
                with open(rows_file, "wb") as out, cur.cursor.copy(
                        f"COPY (SELECT {columns} FROM projects_query WHERE project_id = {project.pk} ORDER BY id) TO STDOUT") as copy:
                    for data in copy:
                        out.write(data)
                cur.execute("DROP TABLE IF EXISTS bench_ingest_indexed")
                cur.execute("CREATE TABLE bench_ingest_indexed (LIKE projects_query INCLUDING ALL)")
                t0 = time.perf_counter()
                with transaction.atomic():
                    with cur.cursor.copy(f"COPY bench_ingest_indexed ({columns}) FROM STDIN") as copy, open(rows_file, "rb") as f:
                        while chunk := f.read(1 << 20):
                            copy.write(chunk)
                indexed_times.append(time.perf_counter() - t0)
                cur.execute("DROP TABLE bench_ingest_indexed")
            rows_file.unlink()
            print(f"  COPY into an indexed copy of the query table, run {i + 1}: {indexed_times[-1]:.2f} s")

            with connection.cursor() as cur:
                cur.execute("DROP TABLE IF EXISTS bench_ingest_bare")
                cur.execute("CREATE TABLE bench_ingest_bare (text text, label text, channel text)")
                t0 = time.perf_counter()
                with cur.cursor.copy("COPY bench_ingest_bare FROM STDIN (FORMAT csv, HEADER true)") as copy, open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        copy.write(chunk)
                copy_times.append(time.perf_counter() - t0)
                cur.execute("SELECT count(*) FROM bench_ingest_bare")
                assert cur.fetchone()[0] == rows
                cur.execute("DROP TABLE bench_ingest_bare")
            print(f"  COPY run {i + 1}:   {copy_times[-1]:.2f} s")
        # Peak memory of the importing process, before the clean-up below.
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        with connection.cursor() as cur:  # bulk delete first: the ORM would load every row
            cur.execute("DELETE FROM projects_query WHERE project_id IN (SELECT id FROM projects_project WHERE team_id = %s)", [team.pk])
        Team.objects.filter(pk=team.pk).delete()
        path.unlink(missing_ok=True)
        tmpdir.rmdir()

    import_s, copy_s, indexed_s = min(import_times), min(copy_times), min(indexed_times)
    result = {
        "rows": rows, "file_mb": round(size_mb, 2), "import_s": round(import_s, 3), "copy_s": round(copy_s, 3),
        "rows_per_s": round(rows / import_s), "copy_rows_per_s": round(rows / copy_s),
        "ratio_vs_copy": round(import_s / copy_s, 2), "target_ratio": 2.0, "peak_rss_mb": round(peak_rss_mb, 1),
        "copy_indexed_s": round(indexed_s, 3), "copy_indexed_ratio_vs_copy": round(indexed_s / copy_s, 2),
        "ratio_vs_copy_indexed": round(import_s / indexed_s, 2), "search_index_s": round(min(search_times), 3),
    }
    print(f"import: {result['rows_per_s']:,} rows/s; COPY: {result['copy_rows_per_s']:,} rows/s; "
          f"import takes {result['ratio_vs_copy']}x COPY's time (target at most 2x); peak RSS {peak_rss_mb:.0f} MB")
    print(f"COPY of the same rows into a table with the query table's indexes takes {result['copy_indexed_ratio_vs_copy']}x "
          f"the bare COPY; the import takes {result['ratio_vs_copy_indexed']}x that. Search indexing afterwards: "
          f"{result['search_index_s']:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
