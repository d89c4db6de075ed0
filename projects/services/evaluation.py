"""Evaluate students against the teacher(s) on the held-out test split or the golden set.

``evaluation_start`` creates the Evaluation and its Job (task ``evaluation_task`` on the ``gpu``
queue); the task calls ``workers.runs.evaluation.evaluation_run`` (the worker floor), which

1. takes the teacher answers from the latest succeeded GenerationRun whose ``options["split"]``
   is the evaluated split and that asked every teacher of the run every query this evaluation
   scores (a run made with ``--limit``, or before more queries were imported, is not reused);
   when there is none it starts one over those queries through
   ``projects.services.generation.generation_start`` and waits for it. A teacher's answer is its
   ORIGINAL answer (``Sample.response``, never a reviewer's edit) at the lowest sample index that
   did not fail; a query that a teacher has no answer for (its request failed: an API error)
   is left out for every model, and counted as ``teacher_missing``, so teacher and students are
   always scored on the same queries;
2. runs every student artifact (``adapter``, ``merged``, ``int8``, ``classifier``) and the
   untouched base student of each training run over the same queries, one query at a time;
3. writes one EvalResult per model (metrics, quality, quality retention, latency p50/p95 in ms,
   throughput in queries/s, size in bytes, cost per 1,000 queries in USD) and one EvalPrediction
   per model and query, measures speculative decoding when the teacher is local and a student
   shares its tokenizer, then stores the verdict, the summary and the plotly charts.

Quality is the task's headline metric (accuracy, field F1, ROUGE-L) against the gold references
when the queries have them, else against the primary teacher's answers (the teacher then scores
1.0). Cost of a local model = mean compute time per query x an hourly machine price:
``Evaluation.options["price_per_hour_usd"]``, else ``project.checks["eval_price_per_hour_usd"]``,
else $0.10/h on CPU and $2.00/h on a GPU.
"""
from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from projects.models import Evaluation, Job, JobStatus, Project, Query, Split, Teacher
from projects.services import InvalidInput, InvalidState
from projects.services.idempotency import idempotency_key_parse, start_find_earlier
from projects.services.jobs import job_create, job_enqueue
from projects.services.permissions import ensure_can_write

EVAL_SPLITS = ("test", "golden")


def evaluation_queries(*, project: Project, split: str):
    """The queries an evaluation of ``split`` scores: the held-out test split (not golden) or
    the golden set, in id order."""
    qs = Query.objects.filter(project=project)
    qs = qs.filter(golden=True) if split == "golden" else qs.filter(split=Split.TEST, golden=False)
    return qs.order_by("id")


def evaluation_start(*, project: Project, user=None, split: str = "test", options: dict | None = None,
                     idempotency_key=None) -> Evaluation:
    """Queue an evaluation of every student and the teacher(s) on ``split`` (``test`` or
    ``golden``). ``options``: ``{"limit": int (first N queries), "price_per_hour_usd": float,
    "speculative_prompts": int (default 3)}``.

    Returns the Evaluation (``evaluation.job`` is its Job). Double submits (see
    ``projects.services.idempotency``): the evaluation created with ``idempotency_key`` (a UUID
    from the Evaluate form) is returned when there is one, else one of the same split and
    options whose job is still queued or running; its ``reused`` says which happened.

    Raises NotAllowed for viewers, InvalidInput for an unknown split or option or a malformed
    key, InvalidState when the split has no queries or the project has no teacher."""
    ensure_can_write(user=user, team=project.team)
    options = dict(options or {})
    if split not in EVAL_SPLITS:
        raise InvalidInput(f"split: {split!r} is not one of {', '.join(EVAL_SPLITS)}")
    if "limit" in options and options["limit"] is not None:
        try:
            options["limit"] = int(options["limit"])
        except (TypeError, ValueError):
            raise InvalidInput(f"limit: {options['limit']!r} is not a whole number") from None
        if not 1 <= options["limit"] <= 2**31 - 1:
            raise InvalidInput(f"limit: {options['limit']} is outside 1-{2**31 - 1}")
    if "price_per_hour_usd" in options and options["price_per_hour_usd"] is not None:
        try:
            options["price_per_hour_usd"] = float(options["price_per_hour_usd"])
        except (TypeError, ValueError):
            raise InvalidInput(f"price_per_hour_usd: {options['price_per_hour_usd']!r} is not a number") from None
        if not 0 <= options["price_per_hour_usd"] <= 1e6:  # also refuses inf and nan
            raise InvalidInput(f"price_per_hour_usd: must be between 0 and 1000000, got {options['price_per_hour_usd']}")
    if not evaluation_queries(project=project, split=split).exists():
        where = "golden set" if split == "golden" else "held-out test split"
        raise InvalidState(f"the {where} of project {project.slug!r} has no queries; import queries first")
    if not Teacher.objects.filter(project=project).exists():
        raise InvalidState(f"project {project.slug!r} has no teacher; add one on the Teachers page")

    key = idempotency_key_parse(key=idempotency_key)
    with transaction.atomic():
        earlier = start_find_earlier(model=Evaluation, project=project, key=key,
                                     same=lambda e: (e.split, e.options) == (split, options))
        if earlier is not None:
            earlier.reused = True
            return earlier
        ev = Evaluation.objects.create(project=project, split=split, options=options, idempotency_key=key,
                                       created_by=user if (user is not None and user.is_authenticated) else None)
        job = job_create(kind="evaluation", team=project.team, project=project, user=user,
                         payload={"evaluation_id": ev.pk, "split": split})
        ev.job = job
        ev.save(update_fields=["job"])
        job_enqueue(job=job, task="workers.tasks.evaluation_task", queue="gpu")
    ev.reused = False
    return ev


def _sync_evaluation(job: Job) -> None:
    Evaluation.objects.filter(job=job).exclude(status=JobStatus.SUCCEEDED).update(
        status=job.status, finished_at=job.finished_at or timezone.now())


def evaluation_api_summary(*, evaluation: Evaluation) -> dict:
    """The CLI/JSON shape: ``{"evaluation", "status", "split", "verdict", "ready_to_ship",
    "summary", "results": [{"model", "role", "metrics", "quality", "quality_retention",
    "latency_ms_p50", "latency_ms_p95", "throughput_qps", "size_bytes", "cost_per_1k_usd", "layers",
    "student_size", "speedup"}]}``: ``layers`` the model's transformer layers, ``student_size``
    its student-size preset (light / medium / heavy, else null), ``speedup`` the teacher's p50
    latency over this model's (students only)."""
    rows = evaluation.results.order_by("id")
    return {
        "evaluation": evaluation.pk, "status": evaluation.status, "split": evaluation.split,
        "verdict": evaluation.verdict, "ready_to_ship": evaluation.ready_to_ship, "summary": evaluation.summary,
        "results": [{"model": r.model_name, "role": r.role, "metrics": r.metrics, "quality": r.quality,
                     "quality_retention": r.quality_retention, "latency_ms_p50": r.latency_ms_p50,
                     "latency_ms_p95": r.latency_ms_p95, "throughput_qps": r.throughput_qps,
                     "size_bytes": r.size_bytes, "cost_per_1k_usd": r.cost_per_1k_usd,
                     "layers": (r.metrics or {}).get("layers"), "student_size": (r.metrics or {}).get("student_size"),
                     "speedup": (r.metrics or {}).get("speedup_vs_teacher")} for r in rows],
    }
