"""Verb: ``import`` (queries from CSV, TSV, JSONL, JSON or plain text)."""
from __future__ import annotations

from pathlib import Path

from projects.cli import CliError
from projects.cli.foundation import get_project
from projects.services.ingest import dataset_report
from workers.runs.ingest import dataset_import


def register(sub) -> None:
    p = sub.add_parser("import", help="import queries from a CSV, TSV, JSONL, JSON or text file (one transaction)")
    p.add_argument("--project", required=True)
    p.add_argument("file")
    p.add_argument("--text-column", help="CSV column name or 1-based number (JSONL: key) holding the query")
    p.add_argument("--reference-column", help="column (or key) with the reference answer / label")
    p.add_argument("--golden", action="store_true", help="import as the golden set (never used for training)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--header", dest="header", action="store_true", default=None, help="the CSV's first row is a header")
    g.add_argument("--no-header", dest="header", action="store_false", help="the CSV has no header row")
    p.set_defaults(handler=cmd_import)


def cmd_import(o: dict) -> dict:
    project = get_project(o["project"])
    path = Path(o["file"])
    if not path.is_file():
        raise CliError(f"FILE: {str(path)!r} is not a readable file")
    dataset = dataset_import(project=project, file_path=path, filename=path.name, text_column=o.get("text_column"),
                             reference_column=o.get("reference_column"), golden=o["golden"], header=o.get("header"))
    report = dataset_report(dataset=dataset)
    s = report["splits"]
    lines = [f"{dataset.name}: imported {report['imported']:,} queries, {report['duplicates']:,} duplicates, "
             f"{report['skipped_total']:,} skipped ({report['format']}, {report['encoding']})"]
    if o["golden"]:
        lines.append(f"golden set: {report['golden']:,}")
    else:
        lines.append(f"splits: train {s['train']:,}, validation {s['validation']:,}, test {s['test']:,}")
    for sk in report["skipped"][:20]:
        lines.append(f"  skipped line {sk['line']}: {sk['reason']}")
    if report["skipped_total"] > 20:
        lines.append(f"  ... and {report['skipped_total'] - 20:,} more (see --json)")
    for w in report["warnings"]:
        lines.append(f"  warning: {w['reason']}")
    report["_human"] = "\n".join(lines)
    return report
