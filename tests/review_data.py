"""Rows for the review tests: a generation run with samples created directly with the ORM (the
teacher-generation code is tested on its own)."""
from __future__ import annotations

import hashlib

from projects.models import GenerationRun, Query, Sample, Teacher


def make_samples(project, rows, *, teacher_name="gpt-teacher", split="train", run_split=None):
    """Create one Sample per ``rows`` item: ``{"query", "response", "status", "failed":
    [(name, reason)], "parsed", "label_probs", "teacher", "split", "golden"}`` (only ``query``
    required), all in one new GenerationRun (``run_split``: its ``options["split"]``, none by
    default, as in runs made before evaluation runs existed). Returns the samples in order."""
    run = GenerationRun.objects.create(project=project, options={"split": run_split} if run_split else {})
    teachers = {}
    out = []
    for i, r in enumerate(rows):
        tname = r.get("teacher", teacher_name)
        if tname not in teachers:
            teachers[tname] = Teacher.objects.get_or_create(project=project, name=tname,
                                                            defaults={"provider": "openai", "model": tname})[0]
        text = r["query"]
        q, _ = Query.objects.get_or_create(project=project, golden=r.get("golden", False),
                                           text_hash=hashlib.sha256(text.encode()).hexdigest(),
                                           defaults={"text": text, "split": r.get("split", split)})
        failed = r.get("failed", [])
        checks = [{"name": "non_empty", "passed": True, "reason": ""}]
        checks += [{"name": n, "passed": False, "reason": why} for n, why in failed]
        status = r.get("status", "rejected" if failed else "accepted")
        out.append(Sample.objects.create(
            run=run, query=q, teacher=teachers[tname], sample_index=0, response=r.get("response", "card_arrival"),
            parsed=r.get("parsed"), label_probs=r.get("label_probs"), checks=checks,
            failed_checks=[n for n, _ in failed], status=status))
    return out
