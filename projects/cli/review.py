"""Verbs: ``export`` (the curated dataset as OpenAI chat or Hugging Face JSONL, or a frozen
dataset version) and ``dataset-versions``."""
from __future__ import annotations

import sys

from projects.cli import CliError
from projects.cli.foundation import get_project
from projects.models import DatasetVersion
from projects.selectors import dataset_versions
from projects.services.datasets import dataset_version_export
from projects.services.review import EXPORT_FORMATS, curated_dataset_export


def register(sub) -> None:
    p = sub.add_parser("export", help="export the curated dataset (or a frozen dataset version) as JSONL (UTF-8)")
    p.add_argument("--project", help="the project whose curated dataset to export now")
    p.add_argument("--format", choices=EXPORT_FORMATS, dest="format")
    p.add_argument("--version", type=int, help="a dataset version's id (see dataset-versions): its frozen file as is")
    p.add_argument("--out", required=True, help="output file path")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("dataset-versions", help="the frozen curated-dataset versions of a project")
    p.add_argument("--project", required=True)
    p.set_defaults(handler=cmd_dataset_versions)


def _usage(message: str) -> None:
    """A usage error: one line on stderr, exit status 2 (as argparse does)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def cmd_export(o: dict) -> dict:
    if o.get("version") is not None:
        if o.get("project") or o.get("format"):
            _usage("--version: give either --version ID or --project SLUG --format F, not both")
        version = DatasetVersion.objects.filter(pk=o["version"]).first()
        if version is None:
            raise CliError(f"--version: no dataset version with id {o['version']}")
        result = dataset_version_export(version=version, path=o["out"])
        result["_human"] = (f"exported dataset version v{version.number} of {version.project.slug} "
                            f"({result['rows']} rows) to {result['path']} (sha256 {result['sha256']})")
        return result
    if not o.get("project") or not o.get("format"):
        _usage("--project: give --project SLUG and --format F (or --version ID)")
    project = get_project(o["project"])
    result = curated_dataset_export(project=project, fmt=o["format"], path=o["out"])
    if result["rows"] == 0:
        # An empty file is still written (a valid, empty dataset); say so plainly.
        result["_human"] = f"exported 0 rows to {result['path']} (the curated dataset is empty)"
    else:
        result["_human"] = f"exported {result['rows']} rows to {result['path']} (sha256 {result['sha256']})"
    return result


def cmd_dataset_versions(o: dict) -> dict:
    """``{project, versions: [{id, version, sha256, rows, size_bytes, format, path, created_at,
    runs}]}``, newest first; ``path`` relative to MEDIA_ROOT, ``runs`` the training run ids."""
    project = get_project(o["project"])
    versions = [{"id": v.pk, "version": v.number, "sha256": v.sha256, "rows": v.rows, "size_bytes": v.size_bytes,
                 "format": v.format, "path": v.path, "created_at": v.created_at.isoformat(), "runs": v.run_ids}
                for v in dataset_versions(project)]
    lines = [f"v{v['version']} (id {v['id']})  {v['rows']} rows  sha256 {v['sha256']}  runs {v['runs'] or '-'}"
             for v in versions] or [f"{project.slug} has no dataset versions yet"]
    return {"project": project.slug, "versions": versions, "_human": "\n".join(lines)}
