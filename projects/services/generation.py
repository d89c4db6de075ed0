"""Teachers and generation runs, the request side: teacher settings, starting / cancelling /
resuming a run, and the run's counters. The worker-side processing of a run's chunks lives in
``workers.runs.generation`` (called by the tasks in workers/tasks.py).

How a run executes: ``generation_start`` creates the GenerationRun and its Job and queues the
coordinator task after commit. The coordinator (``workers.runs.generation.generation_coordinate``)
splits the run's pending queries into chunks of ``options["chunk_size"]`` (default 50) queries and
sends one ``generation_chunk_task`` per chunk, so any number of workers can take them; it takes unclaimed
chunks itself too (a chunk is claimed once, with a Redis ``SET NX``), then polls the samples
until every (query, teacher) group is finished, keeping the run's counters and the Job's
progress current. Each sample slot (run, query, teacher, sample_index) is written once: slots
already done are skipped and inserts ignore conflicts, so a worker killed mid-run and a resume
leave exactly one result per slot.
"""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q, Sum
from django.utils import timezone

from projects.models import GenerationRun, Job, JobStatus, Project, Query, Sample, Teacher, TaskType
from projects.selectors import project_task_spec
from projects.services import InvalidInput, InvalidState
from projects.services.idempotency import idempotency_key_parse, start_find_earlier
from projects.services.jobs import job_create, job_enqueue
from projects.services.permissions import ensure_can_write
from projects.services.security import model_ref_check, model_ref_resolve, security_policy, teacher_endpoint_check


JOB_KIND = "generation"
DEFAULT_CHUNK_SIZE = 50
DEFAULT_QUEUE = "teacher"
SPLITS = ("train", "validation", "test", "golden")
#: Largest ``limit`` of a run (the column is a PostgreSQL integer).
MAX_LIMIT = 2**31 - 1
#: Artifact kinds a local (transformers) teacher can run: a causal LM folder.
LOCAL_TEACHER_KINDS = ("merged",)
#: How a run with a ``limit`` picks its queries: ``first`` N by id, or ``diverse`` (MiniLM
#: embeddings, k-means, the query nearest each centroid: ``workers.pipeline.diversity``).
SELECTIONS = ("first", "diverse")


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
                     chunk_size: int | None = None, idempotency_key=None, selection: str = "first",
                     seed: int = 0, duplicate_threshold: float = 0.95) -> GenerationRun:
    """Start a generation run: every ``split`` query (train by default; ``test``/``golden`` for
    the evaluation's teacher answers, never part of the curated dataset), or ``limit`` of them,
    goes to each teacher (``teachers``: Teacher rows or names; default every teacher that is not
    an ensemble member or the judge). ``samples_per_query`` (1-20) slots per query are drawn by
    rejection sampling at the teacher's temperature; ``concurrency`` (1-512) requests in flight
    per worker; ``budget_usd`` stops the run before its cost would pass the cap.

    ``selection`` decides which ``limit`` queries: ``first`` (the first N by id) or ``diverse``
    (N that cover the query space: MiniLM embeddings, k-means with k = N, the query nearest each
    centroid, deterministic for ``seed``; see ``workers.pipeline.diversity``). With ``diverse``
    the worker also reports near-duplicate queries (cosine similarity >= ``duplicate_threshold``,
    0-1]). The chosen query ids are computed once by the worker and stored in
    ``run.options["selected_query_ids"]``, so a resumed run asks exactly the same queries.

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
    selection = selection or "first"
    if selection not in SELECTIONS:
        raise InvalidInput(f"selection: {selection!r} is not one of {', '.join(SELECTIONS)}")
    try:
        duplicate_threshold = float(duplicate_threshold)
        seed = int(seed)
    except (TypeError, ValueError):
        raise InvalidInput("duplicate_threshold / seed: not a number") from None
    if not (0.0 < duplicate_threshold <= 1.0):
        raise InvalidInput(f"duplicate_threshold: {duplicate_threshold} is outside (0, 1]")
    if not (0 <= seed <= 2**31 - 1):
        raise InvalidInput(f"seed: {seed} is outside 0-{2**31 - 1}")
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
    if selection == "diverse":  # absent means "first" (runs before this option, and the default)
        options.update(selection=selection, seed=seed, duplicate_threshold=duplicate_threshold)
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


# --- Run state (shared with the worker side, workers.runs.generation) --------------------------


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
                         max_retries=int((t.options or {}).get("max_retries", 4)), members=members,
                         cache_dir=str(settings.MODEL_CACHE_DIR))


def judge_model_config(*, project: Project, ref: str):
    """The TeacherConfig of a local LLM judge named by a model reference (the project's
    ``checks["judge_model"]``), for the worker: resolved with ``model_ref_resolve`` (a ``merged``
    artifact of THIS project, or a name the operator's policy allows now), greedy (temperature
    0), at most 8 new tokens (a score from 1 to 5). Raises RunStopped (``refused``) when the
    reference is refused now."""
    from workers.pipeline.teachers import RunStopped, TeacherConfig

    try:
        model, policy = model_ref_resolve(project=project, ref=ref, field="checks.judge_model", kinds=LOCAL_TEACHER_KINDS)
    except (InvalidInput, InvalidState) as exc:
        raise RunStopped("refused", f"judge: {exc}") from None
    return TeacherConfig(id=0, name=f"judge {ref}", provider=Teacher.Provider.TRANSFORMERS, model=model, policy=policy,
                         temperature=0.0, max_tokens=8, cache_dir=str(settings.MODEL_CACHE_DIR))


def _configs(run: GenerationRun, *, resolve: bool = False) -> dict:
    return {t.pk: _teacher_config(t, resolve=resolve) for t in run.teachers.order_by("id")}


def _effective_n(run: GenerationRun, task, configs) -> dict[int, int]:
    from workers.pipeline.generation import effective_samples_per_query

    return {tid: effective_samples_per_query(cfg, task, run.samples_per_query) for tid, cfg in configs.items()}


def _run_query_ids(run: GenerationRun) -> list[int]:
    """The run's query ids: the stored selection (``options["selected_query_ids"]``, written once
    by the worker for ``diverse`` runs) when there is one, else the first ``limit`` by id."""
    stored = (run.options or {}).get("selected_query_ids")
    if stored is not None:
        return [int(q) for q in stored]
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


__all__ = ["SELECTIONS", "teacher_create", "teacher_update", "generation_start", "generation_cancel", "generation_resume",
           "GenerationStopped"]
