"""Verbs of ``python manage.py distill`` (see ../shared/CONTRACT.md). Each module here defines
``register(subparsers)`` adding its verbs; a verb's handler takes the parsed ``options`` (a
dict) and returns the dict printed as JSON with ``--json``, or raises ``CliError`` (exit 1)."""
from __future__ import annotations

import json
import sys


class CliError(Exception):
    """Input or state at fault: the command prints the one-line message on stderr, exits 1."""


def emit(options: dict, result: dict, human: str | None = None) -> None:
    """Print ``human`` (or a short key: value listing) and, with ``--json``, the result as one
    JSON object on the last line of stdout."""
    out = sys.stdout
    if options.get("json"):
        if human:
            out.write(human.rstrip("\n") + "\n")
        out.write(json.dumps(result, default=str, ensure_ascii=False) + "\n")
    else:
        if human:
            out.write(human.rstrip("\n") + "\n")
        else:
            for k, v in result.items():
                out.write(f"{k}: {v if not isinstance(v, (dict, list)) else json.dumps(v, default=str, ensure_ascii=False)}\n")
    out.flush()


def wait_for_job(job_id: int, *, poll_s: float = 1.0, echo: bool = True) -> "object":
    """Block until job ``job_id`` ends, printing progress lines to stderr; returns the Job."""
    import time

    from projects.models import Job

    last = None
    while True:
        job = Job.objects.get(pk=job_id)
        line = f"[job {job.pk} {job.kind}] {job.status} {job.progress * 100:.0f}% {job.message}"
        if echo and line != last:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last = line
        if job.ended:
            return job
        time.sleep(poll_s)


def finish_job(options: dict, job_id: int, summary, what: str, reason=lambda: "") -> dict:
    """The end of a verb that queued a job: with ``--wait`` block until job ``job_id`` ends and,
    unless it succeeded, print ``summary()`` and raise CliError (exit 1) naming ``what`` and why
    (``reason()``, else the job's error or message). Returns ``summary()``."""
    if not options.get("wait"):
        return summary()
    job = wait_for_job(job_id)
    result = summary()
    if job.status != "succeeded":
        emit(options, result)
        raise CliError(f"{what} ended {job.status}: {reason() or job.error or job.message}")
    return result
