"""Verb: ``export`` (the curated dataset as OpenAI chat or Hugging Face JSONL)."""
from __future__ import annotations

from projects.cli.foundation import get_project
from projects.services.review import EXPORT_FORMATS, curated_dataset_export


def register(sub) -> None:
    p = sub.add_parser("export", help="export the curated dataset as JSONL (UTF-8)")
    p.add_argument("--project", required=True)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="format")
    p.add_argument("--out", required=True, help="output file path")
    p.set_defaults(handler=cmd_export)


def cmd_export(o: dict) -> dict:
    project = get_project(o["project"])
    result = curated_dataset_export(project=project, fmt=o["format"], path=o["out"])
    if result["rows"] == 0:
        # An empty file is still written (a valid, empty dataset); say so plainly.
        result["_human"] = f"exported 0 rows to {result['path']} (the curated dataset is empty)"
    else:
        result["_human"] = f"exported {result['rows']} rows to {result['path']} (sha256 {result['sha256']})"
    return result

