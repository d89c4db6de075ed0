"""Verb: ``demo`` — the whole loop on the bundled demo project (see projects/cli/demo_loop.py).

Progress goes to stderr, the summary table to stdout and, with ``--json``, the summary as one
JSON object on the last line of stdout."""
from __future__ import annotations

import sys

from projects.cli import CliError
from projects.services import ServiceError


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole loop on the bundled demo project and print a summary")
    p.add_argument("--limit", type=int, default=None,
                   help="train queries sent to the teacher (default 240; 0 for all of them)")
    p.add_argument("--rerun", action="store_true",
                   help="run generation, training and evaluation again even when an earlier demo finished them")
    p.add_argument("--student", action="append", metavar="METHOD:MODEL",
                   help="a student to train, e.g. classifier-kd:minilm-l6 (repeatable; default "
                        "classifier-kd:minilm-l6 and sft-lora:smollm2-135m-instruct)")
    p.add_argument("--preset", default="fast", help="training preset for the students (default fast)")
    p.add_argument("--openai-key-env", default="OPENAI_API_KEY",
                   help="environment variable whose key, when set, makes an OpenAI-compatible endpoint the teacher")
    p.set_defaults(handler=cmd_demo)


def _progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cmd_demo(o: dict) -> dict:
    from projects.models import TrainingMethod
    from projects.cli.demo_loop import DEFAULT_GENERATION_LIMIT, STUDENTS, demo_run, demo_summary_text

    limit = o.get("limit")
    if limit is not None and limit < 0:
        raise CliError("--limit: must be 0 (all train queries) or more")
    limit = DEFAULT_GENERATION_LIMIT if limit is None else (None if limit == 0 else limit)
    students = []
    for spec in o.get("student") or []:
        method, sep, model = spec.partition(":")
        if not sep or not model.strip():
            raise CliError(f"--student {spec!r}: give METHOD:MODEL, e.g. classifier-kd:minilm-l6")
        if method not in TrainingMethod.values:
            raise CliError(f"--student {spec!r}: method must be one of {', '.join(TrainingMethod.values)}")
        students.append((method, model.strip()))
    try:
        result = demo_run(report=_progress, openai_key_env=o.get("openai_key_env") or "OPENAI_API_KEY",
                          generation_limit=limit, rerun=bool(o.get("rerun")), preset=o.get("preset") or "fast",
                          students=tuple(students) or STUDENTS, report_summary=False)
    except ServiceError as exc:
        raise CliError(f"demo: {exc}") from None
    result["_human"] = demo_summary_text(result=result)
    return result
