"""Teachers and generation runs: teacher settings, starting / cancelling / resuming a run, and the
worker-side processing of a run's chunks (called by the tasks in workers/tasks.py).

How a run executes: ``generation_start`` creates the GenerationRun and its Job and queues the
coordinator task after commit. The coordinator (``generation_coordinate``) splits the run's
pending queries into chunks of ``options["chunk_size"]`` (default 50) queries and sends one
``generation_chunk_task`` per chunk, so any number of workers can take them; it takes unclaimed
chunks itself too (a chunk is claimed once, with a Redis ``SET NX``), then polls the samples
until every (query, teacher) group is finished, keeping the run's counters and the Job's
progress current. Each sample slot (run, query, teacher, sample_index) is written once: slots
already done are skipped and inserts ignore conflicts, so a worker killed mid-run and a resume
leave exactly one result per slot.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Max, Q, Sum
from django.utils import timezone

from projects.models import JOB_ENDED, GenerationRun, Job, JobStatus, Project, Query, Sample, Teacher, TaskType
from projects.selectors import project_task_spec
from projects.services import InvalidInput, InvalidState
from projects.services.idempotency import idempotency_key_parse, start_find_earlier
from projects.services.jobs import job_create, job_enqueue, task_send
from projects.services.permissions import ensure_can_write
from projects.services.security import model_ref_check, model_ref_resolve, security_policy, teacher_endpoint_check

log = logging.getLogger(__name__)

JOB_KIND = "generation"
DEFAULT_CHUNK_SIZE = 50
DEFAULT_QUEUE = "teacher"
# On cancel, requests already in flight get this long to finish so answers already paid for
# are kept; then they are dropped. Cancel therefore takes at most ~1 s (the check) + this.
CANCEL_GRACE_S = 2.0
SPLITS = ("train", "validation", "test", "golden")
#: Largest ``limit`` of a run (the column is a PostgreSQL integer).
MAX_LIMIT = 2**31 - 1
#: Artifact kinds a local (transformers) teacher can run: a causal LM folder.
LOCAL_TEACHER_KINDS = ("merged",)


def _decimal(field: str, value, *, max_digits: int, decimal_places: int, positive: bool = False) -> Decimal:
    """``value`` as a Decimal that fits a ``DecimalField(max_digits, decimal_places)``: finite,
    not negative (above 0 with ``positive``) and below 10 ** (max_digits - decimal_places).
    Raises InvalidInput naming ``field`` (NaN, Infinity and 1e999999 included)."""
    try:
        d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError, TypeError):
        raise InvalidInput(f"{field}: {value!r} is not a number") from None
    if not d.is_finite():
        raise InvalidInput(f"{field}: {value!r} is not a finite number")
    cap = Decimal(10) ** (max_digits - decimal_places)
    if d >= cap:
        raise InvalidInput(f"{field}: {value} is too large (the limit is below {cap:,})")
    if d < 0 or (positive and d <= 0):
        raise InvalidInput(f"{field}: must be {'more than' if positive else 'at least'} 0, got {value}")
    return d


class GenerationStopped(InvalidState):
    """The run stopped before the end (``reason``: insufficient_quota, authentication, budget,
    or a chunk's error); Resume continues it."""


# --- Teachers ---------------------------------------------------------------------------------


def _validate_teacher_fields(*, provider: str, model: str, base_url: str, api_key_env: str, temperature: float,
                             max_tokens: int, top_logprobs: int | None, price_in_per_1m, price_out_per_1m,
                             timeout_s: float) -> None:
    if provider not in Teacher.Provider.values:
        raise InvalidInput(f"provider: {provider!r} is not one of {', '.join(Teacher.Provider.values)}")
    if provider == Teacher.Provider.OPENAI and not model:
        raise InvalidInput("model: an openai teacher needs the model name the endpoint serves (e.g. gpt-4o-mini)")
    # The key variable must be on the operator's list and the URL reach only allowed addresses
    # (projects/services/security.py); the worker checks both again before its requests.
    teacher_endpoint_check(base_url=base_url, api_key_env=api_key_env)
    if not (0.0 <= float(temperature) <= 2.0):
        raise InvalidInput(f"temperature: {temperature} is outside 0-2")
    if not (1 <= int(max_tokens) <= 131072):
        raise InvalidInput(f"max_tokens: {max_tokens} is outside 1-131072")
    if top_logprobs is not None and not (0 <= int(top_logprobs) <= 20):
        raise InvalidInput(f"top_logprobs: {top_logprobs} is outside 0-20")
    for name, v in (("price_in_per_1m", price_in_per_1m), ("price_out_per_1m", price_out_per_1m)):
        _decimal(name, v, max_digits=12, decimal_places=6)
    if not (0.1 <= float(timeout_s) <= 3600):
        raise InvalidInput(f"timeout_s: {timeout_s} is outside 0.1-3600 seconds")


def _check_lengths(**values) -> None:
    """Raise InvalidInput naming the first text that is longer than its Teacher column."""
    for field, value in values.items():
        limit = Teacher._meta.get_field(field).max_length
        if value is not None and len(str(value)) > limit:
            raise InvalidInput(f"{field}: at most {limit} characters, got {len(str(value))}")


def _resolve_teachers(project: Project, items) -> list[Teacher]:
    out = []
    for t in items or []:
        if isinstance(t, Teacher):
            if t.project_id != project.pk:
                raise InvalidInput(f"teacher {t.name!r} belongs to another project")
            out.append(t)
        else:
            found = Teacher.objects.filter(project=project, name=str(t)).first()
            if found is None:
                raise InvalidInput(f"teacher: no teacher named {t!r} in project {project.slug}")
            out.append(found)
    return out


def teacher_create(*, project: Project, name: str, provider: str, model: str = "", base_url: str = "", api_key_env: str = "",
                   temperature: float = 0.3, max_tokens: int = 256, top_logprobs: int | None = None,
                   price_in_per_1m=0, price_out_per_1m=0, members=None, user=None, timeout_s: float = 60.0) -> Teacher:
    """Add a teacher to ``project``.

    ``provider``: ``openai`` (any OpenAI-compatible endpoint: ``model`` required, ``base_url``
    default OpenAI's and only to addresses the operator allows, ``api_key_env`` the NAME of an
    environment variable on the operator's list ``DISTILLHUB_TEACHER_KEY_ENVS`` — the key itself
    is never stored), ``transformers`` (a local model: bundled short name, HF id ``org/name``,
    ``artifact:<id>`` of this project or a folder under ``DISTILLHUB_MODEL_DIRS``; default
    ``smollm2-135m-instruct``) or ``ensemble`` (``members``: Teachers or names of this project). ``temperature`` 0-2, ``max_tokens`` 1-131072, ``top_logprobs`` 0-20, prices in
    USD per 1M tokens, ``timeout_s`` per request. Raises InvalidInput naming the field,
    NotAllowed for viewers."""
    ensure_can_write(user=user, team=project.team)
    name = (name or "").strip()
    if not name:
        raise InvalidInput("name: a teacher needs a name")
    _check_lengths(name=name, model=model, base_url=base_url, api_key_env=api_key_env)
    if provider == Teacher.Provider.TRANSFORMERS and not model:
        from workers.pipeline.registry import SMOLLM2

        model = SMOLLM2
    if provider == Teacher.Provider.TRANSFORMERS:
        model = model_ref_check(project=project, ref=model, field="model", kinds=LOCAL_TEACHER_KINDS)
    _validate_teacher_fields(provider=provider, model=model, base_url=base_url, api_key_env=api_key_env,
                             temperature=temperature, max_tokens=max_tokens, top_logprobs=top_logprobs,
                             price_in_per_1m=price_in_per_1m, price_out_per_1m=price_out_per_1m, timeout_s=timeout_s)
    member_rows = _resolve_teachers(project, members)
    if provider == Teacher.Provider.ENSEMBLE and len(member_rows) < 2:
        raise InvalidInput("members: an ensemble needs at least two member teachers")
    if provider != Teacher.Provider.ENSEMBLE and member_rows:
        raise InvalidInput("members: only an ensemble teacher has members")
    if any(m.provider == Teacher.Provider.ENSEMBLE for m in member_rows):
        raise InvalidInput("members: an ensemble cannot contain another ensemble")
    if Teacher.objects.filter(project=project, name=name).exists():
        raise InvalidInput(f"name: project {project.slug} already has a teacher named {name!r}")
    with transaction.atomic():
        t = Teacher.objects.create(project=project, name=name, provider=provider, model=model, base_url=base_url,
                                   api_key_env=api_key_env, temperature=float(temperature), max_tokens=int(max_tokens),
                                   top_logprobs=top_logprobs, timeout_s=float(timeout_s),
                                   price_in_per_1m=Decimal(str(price_in_per_1m)),
                                   price_out_per_1m=Decimal(str(price_out_per_1m)))
        if member_rows:
            t.members.set(member_rows)
    return t


def teacher_update(*, teacher: Teacher, user=None, **fields) -> Teacher:
    """Change a teacher's settings (same fields and rules as ``teacher_create``, except
    ``provider``). Runs already started keep the settings they were queued with only for requests
    already sent. Raises InvalidInput naming the field, NotAllowed for viewers."""
    ensure_can_write(user=user, team=teacher.project.team)
    allowed = {"name", "model", "base_url", "api_key_env", "temperature", "max_tokens", "top_logprobs",
               "price_in_per_1m", "price_out_per_1m", "timeout_s", "members"}
    unknown = set(fields) - allowed
    if unknown:
        raise InvalidInput(f"{sorted(unknown)[0]}: not a teacher setting that can be changed")
    members = fields.pop("members", None)
    values = {f: getattr(teacher, f) for f in allowed - {"members"}}
    values.update(fields)
    if teacher.provider == Teacher.Provider.TRANSFORMERS and not values["model"]:
        from workers.pipeline.registry import SMOLLM2

        values["model"] = SMOLLM2
    if teacher.provider == Teacher.Provider.TRANSFORMERS:
        values["model"] = model_ref_check(project=teacher.project, ref=values["model"], field="model",
                                          kinds=LOCAL_TEACHER_KINDS)
    _validate_teacher_fields(provider=teacher.provider, **{k: v for k, v in values.items() if k != "name"})
    name = (values["name"] or "").strip()
    if not name:
        raise InvalidInput("name: a teacher needs a name")
    _check_lengths(name=name, model=values["model"], base_url=values["base_url"], api_key_env=values["api_key_env"])
    if Teacher.objects.filter(project=teacher.project, name=name).exclude(pk=teacher.pk).exists():
        raise InvalidInput(f"name: project {teacher.project.slug} already has a teacher named {name!r}")
    values["name"] = name
    with transaction.atomic():
        for k, v in values.items():
            setattr(teacher, k, v)
        teacher.save()
        if members is not None and teacher.provider == Teacher.Provider.ENSEMBLE:
            rows = _resolve_teachers(teacher.project, members)
            if len(rows) < 2:
                raise InvalidInput("members: an ensemble needs at least two member teachers")
            teacher.members.set(rows)
    return teacher


# --- Runs -------------------------------------------------------------------------------------


def _default_teachers(project: Project) -> list[Teacher]:
    """Teachers used when none are named: every teacher of the project except ensemble members
    and the judge (they are called through the ensemble / the judge check)."""
    judge = (project.checks or {}).get("judge_teacher")
    member_ids = set(Teacher.objects.filter(project=project, ensembles__isnull=False).values_list("id", flat=True))
    return [t for t in Teacher.objects.filter(project=project).order_by("id") if t.pk not in member_ids and t.name != judge]


def _split_queries(project: Project, split: str):
    qs = Query.objects.filter(project=project)
    if split == "golden":
        return qs.filter(golden=True)
    return qs.filter(split=split, golden=False)


def generation_start(*, project: Project, user=None, teachers=None, limit: int | None = None, samples_per_query: int = 1,
                     concurrency: int = 16, budget_usd=None, split: str = "train", queue: str | None = None,
                     chunk_size: int | None = None, idempotency_key=None) -> GenerationRun:
    """Start a generation run: every ``split`` query (train by default; ``test``/``golden`` for
    the evaluation's teacher answers, never part of the curated dataset), first ``limit`` by id,
    goes to each teacher (``teachers``: Teacher rows or names; default every teacher that is not
    an ensemble member or the judge). ``samples_per_query`` (1-20) slots per query are drawn by
    rejection sampling at the teacher's temperature; ``concurrency`` (1-512) requests in flight
    per worker; ``budget_usd`` stops the run before its cost would pass the cap.

    The run and its Job are created in one transaction and the coordinator task is queued on
    ``queue`` (default ``teacher``) after commit; ``run.job`` is the Job. Double submits (see
    ``projects.services.idempotency``): the run created with ``idempotency_key`` (a UUID from the
    Generate form) is returned when there is one, else a run with the same teachers, split,
    limit, samples, concurrency, budget, queue and chunk size whose job is still queued or
    running; the returned run's ``reused`` says which happened.

    Raises InvalidInput naming the field, InvalidState when there is no teacher or no query,
    NotAllowed for viewers."""
    ensure_can_write(user=user, team=project.team)
    if split not in SPLITS:
        raise InvalidInput(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if limit is not None and not (1 <= int(limit) <= MAX_LIMIT):
        raise InvalidInput(f"limit: {limit} is outside 1-{MAX_LIMIT}")
    if not (1 <= int(samples_per_query) <= 20):
        raise InvalidInput(f"samples_per_query: {samples_per_query} is outside 1-20")
    if not (1 <= int(concurrency) <= 512):
        raise InvalidInput(f"concurrency: {concurrency} is outside 1-512")
    if budget_usd is not None:
        budget_usd = _decimal("budget_usd", budget_usd, max_digits=12, decimal_places=4, positive=True)
    if chunk_size is not None and not (1 <= int(chunk_size) <= 10000):
        raise InvalidInput(f"chunk_size: {chunk_size} is outside 1-10000")
    rows = _resolve_teachers(project, teachers) if teachers else _default_teachers(project)
    if not rows:
        raise InvalidState(f"project {project.slug} has no teacher: add one on the Teacher data page "
                           "(or `distill teacher add`) first")
    n_queries = _split_queries(project, split).count()
    if n_queries == 0:
        raise InvalidState(f"project {project.slug} has no {split} queries: import queries first")
    if project.task_type == TaskType.CLASSIFICATION and not project.labels:
        raise InvalidState(f"project {project.slug} is a classification project without labels: set its label set first")
    options = {"split": split, "queue": queue or DEFAULT_QUEUE, "chunk_size": int(chunk_size or DEFAULT_CHUNK_SIZE),
               "queries": min(n_queries, int(limit)) if limit else n_queries}
    key = idempotency_key_parse(key=idempotency_key)
    budget = Decimal(str(budget_usd)) if budget_usd is not None else None
    params = (int(samples_per_query), int(concurrency), int(limit) if limit else None, budget, options)
    teacher_ids = {t.pk for t in rows}

    def same(r: GenerationRun) -> bool:
        return ((r.samples_per_query, r.concurrency, r.limit, r.budget_usd, r.options) == params
                and set(r.teachers.values_list("id", flat=True)) == teacher_ids)

    with transaction.atomic():
        earlier = start_find_earlier(model=GenerationRun, project=project, key=key, same=same)
        if earlier is not None:
            earlier.reused = True
            return earlier
        run = GenerationRun.objects.create(
            project=project, samples_per_query=int(samples_per_query), concurrency=int(concurrency),
            limit=int(limit) if limit else None, budget_usd=budget, idempotency_key=key,
            options=options, created_by=user if (user is not None and user.is_authenticated) else None,
        )
        run.teachers.set(rows)
        _attach_job(run, user)
    run.reused = False
    return run


def _attach_job(run: GenerationRun, user) -> Job:

    job = job_create(kind=JOB_KIND, team=run.project.team, project=run.project, user=user, payload={"run_id": run.pk})
    run.job = job
    run.status = JobStatus.QUEUED
    run.finished_at = None
    run.save(update_fields=["job", "status", "finished_at", "stop_reason"])
    job_enqueue(job=job, task="workers.tasks.generation_run_task", queue=(run.options or {}).get("queue") or DEFAULT_QUEUE)
    return job


def generation_cancel(*, run: GenerationRun, user=None) -> GenerationRun:
    """Ask a queued or running run to stop (its workers stop within seconds; samples already
    written stay). Raises InvalidState when it has already ended, NotAllowed for viewers."""
    from projects.services.jobs import job_cancel

    ensure_can_write(user=user, team=run.project.team)
    if run.job is None or run.job.ended:
        raise InvalidState(f"generation run {run.pk} is not running")
    job_cancel(job=run.job, user=user)
    run.refresh_from_db()
    return run


def generation_resume(*, run: GenerationRun, user=None, budget_usd=None) -> GenerationRun:
    """Continue a run that stopped (cancelled, failed, out of quota or budget, worker lost): a new
    Job answers only the unfinished slots — finished (accepted/rejected) samples are kept and never
    asked again; failed samples (no answer) are deleted and retried. ``budget_usd`` replaces the
    cap when given. Raises InvalidState while the run is still queued or running (cancel it first,
    or wait for a lost worker to be marked stale) and when nothing is left to do."""
    ensure_can_write(user=user, team=run.project.team)
    if run.job is not None and not run.job.ended:
        raise InvalidState(f"generation run {run.pk} is still {run.job.status}; cancel it before resuming")
    if budget_usd is not None:
        budget_usd = _decimal("budget_usd", budget_usd, max_digits=12, decimal_places=4, positive=True)
        run.budget_usd = budget_usd
    with transaction.atomic():
        Sample.objects.filter(run=run, status="failed").delete()
        _refresh_counters(run)
        run.refresh_from_db()
        if budget_usd is not None:
            run.budget_usd = Decimal(str(budget_usd))
            run.save(update_fields=["budget_usd"])
        total = _total_groups(run)
        if total and _count_done_groups(run) >= total:
            raise InvalidState(f"generation run {run.pk} has no unfinished slot left")
        run.stop_reason = ""
        _attach_job(run, user)
    return run


def _sync_run_with_job(job: Job) -> None:
    """Mirror the job's final state on its run (also when cancelled while queued or failed as
    stale by the beat task)."""
    run = GenerationRun.objects.filter(job=job).first()
    if run is None:
        return
    _refresh_counters(run)
    fields: dict = {"status": job.status, "finished_at": job.finished_at or timezone.now()}
    run.refresh_from_db(fields=["stop_reason"])
    if not run.stop_reason:
        if job.status == JobStatus.CANCELLED:
            fields["stop_reason"] = "cancelled by user"
        elif job.status == JobStatus.FAILED:
            fields["stop_reason"] = (job.message or job.error or "failed")[:200]
    GenerationRun.objects.filter(pk=run.pk).update(**fields)


# --- Worker side ------------------------------------------------------------------------------


def _teacher_config(t: Teacher, *, resolve: bool = False):
    """The TeacherConfig for ``t`` with the operator's policy (the client checks its settings
    against it before it reads a key, sends a request or loads a model). ``resolve`` (on the
    worker, before making clients): a local teacher's ``artifact:<id>`` becomes that artifact's
    folder (this project's only), and a model reference refused now (e.g. a free path a row
    somehow holds) raises RunStopped (``refused``)."""
    from workers.pipeline.teachers import RunStopped, TeacherConfig

    members = (tuple(_teacher_config(m, resolve=resolve) for m in t.members.order_by("id"))
               if t.provider == Teacher.Provider.ENSEMBLE else ())
    model, policy = t.model, security_policy()
    if resolve and t.provider == Teacher.Provider.TRANSFORMERS and model:
        try:
            model, policy = model_ref_resolve(project=t.project, ref=model, field="model", kinds=LOCAL_TEACHER_KINDS)
        except (InvalidInput, InvalidState) as exc:
            raise RunStopped("refused", f"teacher {t.name}: {exc}") from None
    return TeacherConfig(id=t.pk, name=t.name, provider=t.provider, model=model, base_url=t.base_url, policy=policy,
                         api_key_env=t.api_key_env, temperature=t.temperature, max_tokens=t.max_tokens,
                         top_logprobs=t.top_logprobs, timeout_s=t.timeout_s, price_in_per_1m=float(t.price_in_per_1m),
                         price_out_per_1m=float(t.price_out_per_1m),
                         max_retries=int((t.options or {}).get("max_retries", 4)), members=members)


def _configs(run: GenerationRun, *, resolve: bool = False) -> dict:
    return {t.pk: _teacher_config(t, resolve=resolve) for t in run.teachers.order_by("id")}


def _effective_n(run: GenerationRun, task, configs) -> dict[int, int]:
    from workers.pipeline.generation import effective_samples_per_query

    return {tid: effective_samples_per_query(cfg, task, run.samples_per_query) for tid, cfg in configs.items()}


def _run_query_ids(run: GenerationRun) -> list[int]:
    qs = _split_queries(run.project, (run.options or {}).get("split", "train")).order_by("id").values_list("id", flat=True)
    if run.limit:
        qs = qs[: run.limit]
    return list(qs)


def _total_groups(run: GenerationRun) -> int:
    n_q = (run.options or {}).get("queries")
    if n_q is None:
        n_q = len(_run_query_ids(run))
    return int(n_q) * run.teachers.count()


def _group_rows(run: GenerationRun, query_ids=None):
    qs = Sample.objects.filter(run=run)
    if query_ids is not None:
        qs = qs.filter(query_id__in=query_ids)
    return qs.values("query_id", "teacher_id").annotate(
        acc=Count("id", filter=Q(status="accepted")), n=Count("id"), mx=Max("sample_index"))


def _count_done_groups(run: GenerationRun, n_eff: dict[int, int] | None = None) -> int:
    """Groups (query, teacher) finished: one accepted sample, or every slot drawn."""
    if n_eff is None:
        n_eff = _effective_n(run, project_task_spec(run.project), _configs(run))
    return sum(1 for g in _group_rows(run) if g["acc"] > 0 or g["n"] >= n_eff.get(g["teacher_id"], run.samples_per_query))


def _refresh_counters(run: GenerationRun) -> dict:
    """Recompute the run's counters exactly from its samples."""
    agg = Sample.objects.filter(run=run).aggregate(
        accepted=Count("id", filter=Q(status="accepted")), rejected=Count("id", filter=Q(status="rejected")),
        failed=Count("id", filter=Q(status="failed")), input_tokens=Sum("input_tokens"), output_tokens=Sum("output_tokens"),
        cost_usd=Sum("cost_usd"))
    fields = {k: (v or 0) for k, v in agg.items()}
    GenerationRun.objects.filter(pk=run.pk).update(**fields)
    return fields


def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL)


def _claim_chunk(job: Job, index: int) -> bool:
    """True for the one worker that claims chunk ``index`` of ``job`` (Redis SET NX). The key
    carries the job's creation time too, so a recreated database never meets old claims."""
    key = f"distillhub:generation:{job.pk}:{int(job.created_at.timestamp() * 1e6)}:chunk:{index}"
    return bool(_redis().set(key, "1", nx=True, ex=7 * 24 * 3600))


def generation_coordinate(*, job: Job, reporter) -> dict:
    """The coordinator task's body (see ``_coordinate``). The run's status is written here, before
    the task ends the job, so a page or script that sees the job ended also sees the run ended."""
    from workers.progress import JobCancelled

    run_id = GenerationRun.objects.filter(job=job).values_list("pk", flat=True).first()
    try:
        result = _coordinate(job=job, reporter=reporter)
    except JobCancelled:
        _end_run(run_id, JobStatus.CANCELLED, "cancelled by user")
        raise
    except Exception as exc:
        _end_run(run_id, JobStatus.FAILED, f"Failed: {exc}"[:200])
        raise
    _end_run(run_id, JobStatus.SUCCEEDED, "")
    return result


def _end_run(run_id, status: str, reason: str) -> None:
    if run_id is None:
        return
    run = GenerationRun.objects.get(pk=run_id)
    _refresh_counters(run)
    GenerationRun.objects.filter(pk=run_id).update(status=status, finished_at=timezone.now())
    if reason:
        GenerationRun.objects.filter(pk=run_id, stop_reason="").update(stop_reason=reason)


def _coordinate(*, job: Job, reporter) -> dict:
    """The coordinator task's body: send the pending chunks to the teacher queue, process
    unclaimed ones here, and wait until every group is finished (or the run stops), keeping
    counters and progress current. Returns the summary stored as the job's result. Raises
    GenerationStopped (quota, auth, budget, a chunk's error), JobCancelled on cancel,
    RuntimeError when the other workers stop making progress for ``STALE_JOB_SECONDS``."""
    run = GenerationRun.objects.select_related("project").get(job=job)
    GenerationRun.objects.filter(pk=run.pk).update(status=JobStatus.RUNNING, stop_reason="", finished_at=None)
    task = project_task_spec(run.project)
    configs = _configs(run)
    n_eff = _effective_n(run, task, configs)
    qids = _run_query_ids(run)
    if (run.options or {}).get("queries") != len(qids):
        run.options = {**(run.options or {}), "queries": len(qids)}
        GenerationRun.objects.filter(pk=run.pk).update(options=run.options)
    total = len(qids) * len(configs)
    done = {(g["query_id"], g["teacher_id"]) for g in _group_rows(run)
            if g["acc"] > 0 or g["n"] >= n_eff[g["teacher_id"]]}
    pending = [q for q in qids if any((q, t) not in done for t in configs)]
    size = int((run.options or {}).get("chunk_size") or DEFAULT_CHUNK_SIZE)
    chunks = [pending[i:i + size] for i in range(0, len(pending), size)]
    q = (run.options or {}).get("queue") or DEFAULT_QUEUE
    reporter.report(len(done) / total if total else 1.0, f"{len(done)}/{total} done; {len(chunks)} chunk(s) queued", force=True)
    # Later chunks go to the queue for other workers; this worker takes what is left unclaimed.
    for k, chunk in enumerate(chunks[1:], start=1):
        task_send(name="workers.tasks.generation_chunk_task", args=[job.pk, k, chunk], queue=q)
    for k, chunk in enumerate(chunks):
        reporter.check_cancel()
        _raise_if_stopped(run)
        if _claim_chunk(job, k):
            _process_chunk(job, run, chunk, reporter=reporter, total=total, n_eff=n_eff)
    last_done, last_change = -1, time.monotonic()
    stall_s = getattr(settings, "STALE_JOB_SECONDS", 600)
    while True:
        n_done = _count_done_groups(run, n_eff)
        counters = _refresh_counters(run)
        reporter.report(n_done / total if total else 1.0, _progress_message(n_done, total, counters))
        _raise_if_stopped(run)
        reporter.check_cancel()
        if n_done >= total:
            break
        if n_done != last_done:
            last_done, last_change = n_done, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise RuntimeError(f"no sample was written for {stall_s} s while {total - n_done} group(s) remain: "
                               "a worker taking a chunk was probably lost. Resume the run to finish it.")
        time.sleep(0.5)
    counters = _refresh_counters(run)
    return {"run": run.pk, **{k: (float(v) if isinstance(v, Decimal) else v) for k, v in counters.items()},
            "message": _progress_message(total, total, counters)}


def _progress_message(done: int, total: int, c: dict) -> str:
    return (f"{done}/{total} queries done · {c.get('accepted', 0)} accepted · {c.get('rejected', 0)} rejected · "
            f"{c.get('failed', 0)} failed · ${float(c.get('cost_usd') or 0):.4f}")


def _raise_if_stopped(run: GenerationRun) -> None:
    reason = GenerationRun.objects.filter(pk=run.pk).values_list("stop_reason", flat=True).first()
    if reason:
        raise GenerationStopped(reason)


def generation_chunk_take(*, job_id: int, index: int, query_ids: list[int]) -> None:
    """A chunk task's body: process chunk ``index`` if its job is still running and no other
    worker claimed it; otherwise do nothing (a redelivered or stale message)."""
    from workers.progress import JobReporter

    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status != JobStatus.RUNNING or job.cancel_requested:
        return
    run = GenerationRun.objects.select_related("project").filter(job=job).first()
    if run is None or run.stop_reason:
        return
    if not _claim_chunk(job, index):
        return
    task = project_task_spec(run.project)
    try:
        _process_chunk(job, run, query_ids, reporter=JobReporter(job_id), total=None,
                       n_eff=_effective_n(run, task, _configs(run)))
    except Exception as exc:  # noqa: BLE001 - the coordinator reports it through the run
        log.exception("generation chunk %s of job %s failed", index, job_id)
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"chunk {index} failed: {exc}"[:200])


def _process_chunk(job: Job, run: GenerationRun, query_ids: list[int], *, reporter, total: int | None, n_eff: dict) -> None:
    """Answer the unfinished slots of ``query_ids``: the async pipeline runs in a thread, this
    thread writes each finished sample as it arrives, reports progress, and watches for cancel
    and for a stop set by another worker."""
    from workers.pipeline.checks import duplicate_enabled, normalise_for_duplicate
    from workers.pipeline.generation import Generator, Group
    from workers.pipeline.specs import QueryItem
    from workers.pipeline.teachers import RunStopped, make_client

    task = project_task_spec(run.project)
    configs = _configs(run)
    texts = dict(Query.objects.filter(pk__in=query_ids).values_list("id", "text"))
    state = {(g["query_id"], g["teacher_id"]): g for g in _group_rows(run, query_ids)}
    groups = []
    for qid in query_ids:
        if qid not in texts:
            continue
        for tid in configs:
            g = state.get((qid, tid))
            if g and (g["acc"] > 0 or g["n"] >= n_eff[tid]):
                continue
            groups.append(Group(QueryItem(qid, texts[qid]), tid, (g["mx"] + 1) if g else 0))
    if not groups:
        return
    try:
        clients = {tid: make_client(cfg, labels=task.labels, task_type=task.task_type)
                   for tid, cfg in _configs(run, resolve=True).items()}
        judge = None
        judge_name = (task.checks or {}).get("judge_teacher")
        if judge_name:
            jt = Teacher.objects.filter(project=run.project, name=judge_name).first()
            if jt is None:
                raise RunStopped("judge_missing", f"checks.judge_teacher: no teacher named {judge_name!r}")
            judge = make_client(_teacher_config(jt, resolve=True), labels=(), task_type="generation")
    except RunStopped as exc:
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"{exc.reason}: {exc}"[:200])
        return
    seen: set[str] = set()
    if duplicate_enabled(task):
        seen = {normalise_for_duplicate(r) for r in Sample.objects.filter(run=run, status="accepted")
                .exclude(response=None).values_list("response", flat=True).iterator()}
    out: queue.Queue = queue.Queue()
    spent = float(GenerationRun.objects.filter(pk=run.pk).values_list("cost_usd", flat=True).first() or 0)
    gen = Generator(task, clients, configs, emit=out.put, samples_per_query=run.samples_per_query,
                    concurrency=run.concurrency, budget_usd=float(run.budget_usd) if run.budget_usd is not None else None,
                    spent_usd=spent, judge=judge, seen=seen)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            asyncio.run(gen.run(groups))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writing thread
            failure.append(exc)

    th = threading.Thread(target=loop, name=f"generation-{job.pk}", daemon=True)
    th.start()
    last_check = 0.0
    try:
        while True:
            batch = []
            try:
                batch.append(out.get(timeout=0.2))
                while len(batch) < 200:
                    batch.append(out.get_nowait())
            except queue.Empty:
                pass
            if batch:
                _write_samples(run, batch)
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                row = GenerationRun.objects.filter(pk=run.pk).values("stop_reason", "cost_usd").first() or {}
                jrow = Job.objects.filter(pk=job.pk).values("status", "cancel_requested").first() or {}
                if jrow.get("cancel_requested") or jrow.get("status") in JOB_ENDED:
                    gen.stop("cancelled", "cancelled by user", grace_s=CANCEL_GRACE_S)
                elif row.get("stop_reason"):
                    gen.stop("stopped", row["stop_reason"], grace_s=CANCEL_GRACE_S)
                if gen.budget_usd is not None and row.get("cost_usd") is not None:
                    gen.sync_spent(float(row["cost_usd"]))
                if total:
                    n_done = _count_done_groups(run, n_eff)
                    reporter.report(n_done / total, _progress_message(n_done, total, _refresh_counters(run)))
                else:
                    reporter.report()
            if not th.is_alive() and out.empty():
                break
    finally:
        if th.is_alive():
            gen.stop("cancelled", "the worker stopped")
            th.join(timeout=30)
        rest = []
        while not out.empty():
            rest.append(out.get_nowait())
        if rest:
            _write_samples(run, rest)
    if failure:
        raise failure[0]
    if gen.stop_reason and gen.stop_reason not in ("cancelled", "stopped"):
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"{gen.stop_reason}: {gen.stop_message}"[:200])


def _write_samples(run: GenerationRun, results: list) -> int:
    """Insert finished samples once per slot (existing slots are skipped, conflicts ignored) and
    add the new ones to the run's live counters. Returns how many rows were new."""
    keys = {(r.query_id, r.teacher_id, r.sample_index) for r in results}
    with transaction.atomic():
        existing = set(Sample.objects.filter(run=run, query_id__in={k[0] for k in keys})
                       .values_list("query_id", "teacher_id", "sample_index"))
        new, seen = [], set()
        for r in results:
            k = (r.query_id, r.teacher_id, r.sample_index)
            if k in existing or k in seen:
                continue
            seen.add(k)
            new.append(r)
        Sample.objects.bulk_create([
            Sample(run=run, query_id=r.query_id, teacher_id=r.teacher_id, sample_index=r.sample_index, prompt=r.prompt,
                   response=r.response, parsed=r.parsed, finish_reason=(r.finish_reason or "")[:40],
                   input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                   cost_usd=Decimal(str(round(r.cost_usd, 8))), latency_ms=r.latency_ms, label_probs=r.label_probs,
                   token_logprobs=r.token_logprobs, checks=r.checks, failed_checks=r.failed_checks, status=r.status,
                   error=r.error or "")
            for r in new], ignore_conflicts=True)
        if new:
            GenerationRun.objects.filter(pk=run.pk).update(
                accepted=F("accepted") + sum(r.status == "accepted" for r in new),
                rejected=F("rejected") + sum(r.status == "rejected" for r in new),
                failed=F("failed") + sum(r.status == "failed" for r in new),
                input_tokens=F("input_tokens") + sum(r.input_tokens for r in new),
                output_tokens=F("output_tokens") + sum(r.output_tokens for r in new),
                cost_usd=F("cost_usd") + Decimal(str(round(sum(r.cost_usd for r in new), 8))),
            )
    return len(new)


__all__ = ["teacher_create", "teacher_update", "generation_start", "generation_cancel", "generation_resume",
           "generation_coordinate", "generation_chunk_take", "GenerationStopped"]
