"""Reads used by views, the CLI and exports. Every read that takes an id goes through a
user's teams, so another team's objects answer 404."""
from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from projects.models import Job, Membership, Project, Team


def teams_for_user(user) -> QuerySet[Team]:
    """Teams the user belongs to (any role)."""
    if not user.is_authenticated:
        return Team.objects.none()
    return Team.objects.filter(memberships__user=user)


def projects_for_user(user) -> QuerySet[Project]:
    """Projects of the user's teams, newest first."""
    return Project.objects.filter(team__in=teams_for_user(user)).select_related("team")


def project_for_user(user, slug: str) -> Project:
    """The project with ``slug`` if one of the user's teams owns it; Http404 otherwise."""
    try:
        return projects_for_user(user).get(slug=slug)
    except Project.DoesNotExist:
        raise Http404("No such project") from None


def jobs_for_user(user) -> QuerySet[Job]:
    """Jobs of the user's teams, newest first."""
    return Job.objects.filter(team__in=teams_for_user(user)).select_related("project")


def job_for_user(user, job_id: int) -> Job:
    """The job with ``job_id`` if one of the user's teams owns it; Http404 otherwise."""
    try:
        return jobs_for_user(user).get(pk=job_id)
    except Job.DoesNotExist:
        raise Http404("No such job") from None


def membership_for(user, team: Team) -> Membership | None:
    """The user's membership of ``team``, or None."""
    if not user.is_authenticated:
        return None
    return Membership.objects.filter(team=team, user=user).first()


def user_can_write(user, team: Team) -> bool:
    """True for owners and members of ``team``; viewers and outsiders read at most."""
    m = membership_for(user, team)
    return bool(m and m.can_write)


def project_stages(project: Project) -> list[dict]:
    """The loop as a row of stages for the overview: each ``{"key", "title", "counts": [(label,
    value)], "url_name"}``. Counts come from cheap aggregate queries."""
    from django.db.models import Count, Q

    from projects.models import Evaluation, Query, Sample, TrainingRun

    q = Query.objects.filter(project=project).aggregate(
        total=Count("id"),
        train=Count("id", filter=Q(split="train")),
        test=Count("id", filter=Q(split="test")),
        golden=Count("id", filter=Q(golden=True)),
    )
    reviewable = Q(run_id__in=train_run_ids(project))  # the review queue's scope (reviewable_samples)
    s = Sample.objects.filter(run__project=project).aggregate(
        accepted=Count("id", filter=Q(status="accepted")),
        rejected=Count("id", filter=Q(status="rejected")),
        to_review=Count("id", filter=reviewable & Q(status="rejected", review_status__isnull=True)),
        reviewed=Count("id", filter=reviewable & Q(review_status__isnull=False)),
    )
    runs = TrainingRun.objects.filter(project=project)
    latest_eval = Evaluation.objects.filter(project=project, status="succeeded").first()
    return [
        {"key": "queries", "title": "Queries", "url_name": "queries_page",
         "counts": [("queries", q["total"]), ("train", q["train"]), ("test", q["test"]), ("golden", q["golden"])]},
        {"key": "generation", "title": "Teacher data", "url_name": "generation_page",
         "counts": [("accepted", s["accepted"]), ("rejected", s["rejected"])]},
        {"key": "review", "title": "Review", "url_name": "review_page",
         "counts": [("to review", s["to_review"]), ("reviewed", s["reviewed"])]},
        {"key": "training", "title": "Students", "url_name": "training_page",
         "counts": [("runs", runs.count()), ("succeeded", runs.filter(status="succeeded").count())]},
        {"key": "evaluation", "title": "Evaluation", "url_name": "evaluation_page",
         "counts": [("verdict", latest_eval.verdict if latest_eval and latest_eval.verdict else "—")]
         + evaluation_headline(latest_eval)},
    ]


def train_run_ids(project: Project) -> list[int]:
    """Ids of the project's generation runs over the train split, the curated dataset's source:
    runs whose ``options["split"]`` is ``train``, and runs that name no split (runs made before
    evaluation runs existed, which were all train runs). Runs over the test split or the golden
    set (the evaluation's teacher answers) and the validation split are not among them."""
    from django.db.models import Q

    from projects.models import GenerationRun

    # A literal id list (not a join on runs) lets Postgres estimate row counts and walk the
    # samples' partial indexes in id order.
    return list(GenerationRun.objects.filter(project=project)
                .filter(Q(options__split="train") | ~Q(options__has_key="split"))
                .values_list("id", flat=True))


def reviewable_samples(project: Project):
    """Every sample a reviewer may see or decide: the samples of the project's train-split
    generation runs (``train_run_ids``). The review queue, the audit queue and its draw, bulk
    decisions, the check counts and opening an item by id all start from this queryset, so the
    teacher answers an evaluation scores (test / golden runs) never reach a reviewer and no
    review can change the teacher's measured quality."""
    from projects.models import Sample

    return Sample.objects.filter(run_id__in=train_run_ids(project))


def curated_samples(project: Project):
    """The curated dataset: samples of train-split runs on train-split queries that a human
    accepted, or that the checks accepted and no human rejected, at most ONE per (query,
    teacher). Several runs over the same queries (or a human accepting a rejected slot next to
    an accepted one) leave several candidates; the one kept is, in this order: one a human
    accepted (or edited), then the latest run's, then the lowest sample index, then the lowest
    id. Several teachers in a run each keep their answer (classifier-kd averages them). Ordered
    by id (stable for hashing and export). Export, training rows and ``curated_dataset_sha256``
    all read this queryset."""
    from django.db.models import Case, Exists, IntegerField, OuterRef, Q, Value, When

    from projects.models import Sample, Split

    runs = train_run_ids(project)
    curated = Q(review_status="accepted") | Q(review_status__isnull=True, status="accepted")
    human = Case(When(review_status="accepted", then=Value(1)), default=Value(0), output_field=IntegerField())
    # A candidate is dropped when a better one exists for its (query, teacher). NOT EXISTS (not
    # DISTINCT ON, which sorts every row first) keeps the stream in id order from the first row.
    better = (Sample.objects.filter(curated, run_id__in=runs, query_id=OuterRef("query_id"),
                                    teacher_id=OuterRef("teacher_id"))
              .annotate(human=human)
              .filter(Q(human__gt=OuterRef("human"))
                      | Q(human=OuterRef("human"), run_id__gt=OuterRef("run_id"))
                      | Q(human=OuterRef("human"), run_id=OuterRef("run_id"), sample_index__lt=OuterRef("sample_index"))
                      | Q(human=OuterRef("human"), run_id=OuterRef("run_id"), sample_index=OuterRef("sample_index"),
                          id__lt=OuterRef("id"))))
    return (
        Sample.objects.filter(curated, run_id__in=runs, query__split=Split.TRAIN, query__golden=False)
        .annotate(human=human)
        .filter(~Exists(better))
        .select_related("query", "teacher")
        .order_by("id")
    )


def curated_dataset_rows(project: Project):
    """Yield the curated dataset as plain dicts: ``{"sample_id", "query_id", "query", "answer",
    "label", "label_probs", "teacher"}``; ``answer`` is the human edit when there is one.
    Streams with an iterator, so 100,000 rows do not sit in memory."""
    # Large columns the rows do not use stay in the database (100,000+ rows stream in chunks).
    for s in curated_samples(project).defer("prompt", "token_logprobs", "checks").iterator(chunk_size=2000):
        label = s.parsed if isinstance(s.parsed, str) else None
        yield {"sample_id": s.id, "query_id": s.query_id, "query": s.query.text, "answer": s.final_response,
               "label": label, "label_probs": s.label_probs, "teacher": s.teacher.name}


def curated_dataset_sha256(project: Project) -> tuple[str, int]:
    """Content hash of the curated dataset (sha256 over the canonical JSON of each row's query,
    answer, label and soft labels, in id order) and its row count: training runs record it."""
    import hashlib
    import json

    h = hashlib.sha256()
    n = 0
    for row in curated_dataset_rows(project):
        h.update(json.dumps([row["query"], row["answer"], row["label"], row["label_probs"]],
                            ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
        n += 1
    return h.hexdigest(), n


def golden_reference_queries(project: Project):
    """The project's golden queries that carry a reference answer (not blank), by id: the rows a
    local teacher is domain-tuned on (``projects.services.training.teacher_tune_start``)."""
    from projects.models import Query

    return (Query.objects.filter(project=project, golden=True, reference__isnull=False)
            .exclude(reference__regex=r"^\s*$").order_by("id"))


def golden_references_sha256(project: Project) -> tuple[str, int]:
    """Content hash of the golden references (sha256 over the canonical JSON ``[query text,
    reference]`` of each row, in id order) and their count, as ``curated_dataset_sha256``."""
    import hashlib
    import json

    h = hashlib.sha256()
    n = 0
    for text, ref in golden_reference_queries(project).values_list("text", "reference").iterator(chunk_size=2000):
        h.update(json.dumps([text, ref], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
        n += 1
    return h.hexdigest(), n


# --- Generation -------------------------------------------------------------------------------


def teacher_for_user(user, slug: str, teacher_id: int):
    """A teacher of the user's project ``slug``; Http404 otherwise."""
    from projects.models import Teacher

    project = project_for_user(user, slug)
    try:
        return Teacher.objects.select_related("project", "project__team").get(pk=teacher_id, project=project)
    except Teacher.DoesNotExist:
        raise Http404("No such teacher") from None


def generation_run_for_user(user, slug: str, run_id: int):
    """A generation run of the user's project ``slug``; Http404 otherwise."""
    from projects.models import GenerationRun

    project = project_for_user(user, slug)
    try:
        return GenerationRun.objects.select_related("project", "project__team", "job").get(pk=run_id, project=project)
    except GenerationRun.DoesNotExist:
        raise Http404("No such run") from None


def generation_runs(project: Project):
    """The project's generation runs, newest first, with their jobs and teachers."""
    from projects.models import GenerationRun

    return GenerationRun.objects.filter(project=project).select_related("job").prefetch_related("teachers")


def generation_failed_check_counts(run) -> list[tuple[str, int]]:
    """How many of the run's samples failed each check: ``[(check name, count)]``, most first."""
    from django.db import connection

    from projects.models import Sample

    table = Sample._meta.db_table
    with connection.cursor() as cur:
        cur.execute(f"SELECT e, count(*) FROM {table}, jsonb_array_elements_text({table}.failed_checks) AS e "
                    f"WHERE {table}.run_id = %s GROUP BY e ORDER BY count(*) DESC, e", [run.pk])
        return [(name, n) for name, n in cur.fetchall()]


def generation_eta_s(run) -> float | None:
    """Seconds left for a running run, from its job's progress: elapsed * (1 - p) / p."""
    from django.utils import timezone

    job = run.job
    if job is None or job.ended or not job.started_at or job.progress <= 0:
        return None
    elapsed = (timezone.now() - job.started_at).total_seconds()
    return elapsed * (1 - job.progress) / job.progress

def project_task_spec(project: Project):
    """The project's task definition as the pipeline's ``TaskSpec``."""
    from workers.pipeline.specs import TaskSpec

    return TaskSpec(task_type=project.task_type, instructions=project.instructions or "",
                    labels=tuple(project.labels or ()), output_schema=project.output_schema,
                    few_shot=tuple(project.few_shot or ()), checks=dict(project.checks or {}))


def curated_export_lines(project: Project, fmt: str):
    """Yield the curated dataset as JSONL lines (UTF-8 bytes, each ending in ``\n``, real
    characters rather than ``\\u`` escapes), one per row of ``curated_dataset_rows``.

    ``fmt="openai-chat"``: OpenAI chat fine-tuning rows ``{"messages": [{"role": "user", ...},
    {"role": "assistant", ...}]}``; the user turn is the STUDENT prompt
    (``prompts.student_messages``: short task prefix + query, no system prompt), since the file
    trains a student; the assistant turn is the curated answer (the human edit if any).

    ``fmt="hf-jsonl"``: one flat object a Hugging Face ``datasets.load_dataset("json", ...)``
    loads with a fixed schema: ``{"sample_id", "query", "answer", "label", "label_probs":
    [{"label", "prob"}], "teacher", "prompt": [user message], "completion": [assistant
    message]}`` (``prompt``/``completion`` is TRL's conversational prompt-completion format)."""
    from django.db import transaction

    if fmt not in ("openai-chat", "hf-jsonl"):
        raise ValueError(f"format: {fmt!r} is not one of openai-chat, hf-jsonl")
    # Inside a transaction the server-side cursor is a plain one that Postgres streams; in
    # autocommit Django declares it WITH HOLD, which Postgres materializes in full first.
    with transaction.atomic():
        yield from _export_lines(project, fmt)


def _export_lines(project: Project, fmt: str):
    import json

    from workers.pipeline.prompts import student_messages

    task = project_task_spec(project)
    for row in curated_dataset_rows(project):
        user_msgs = student_messages(task, row["query"])
        answer = {"role": "assistant", "content": row["answer"] or ""}
        if fmt == "openai-chat":
            obj = {"messages": [*user_msgs, answer]}
        else:
            probs = row["label_probs"] or {}
            obj = {"sample_id": row["sample_id"], "query": row["query"], "answer": row["answer"] or "",
                   "label": row["label"],
                   "label_probs": [{"label": str(k), "prob": float(v)} for k, v in probs.items()],
                   "teacher": row["teacher"], "prompt": user_msgs, "completion": [answer]}
        yield (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def review_check_counts(project: Project, *, max_age_s: int = 60) -> list[tuple[str, int]]:
    """``[(check name, samples still to review that failed it)]`` for the review queue's filter,
    sorted by name. An aggregate over every rejected sample (about a second with a million
    samples), so it is cached for ``max_age_s`` seconds per project: the counts are approximate,
    the queue itself is always exact."""
    from django.core.cache import cache
    from django.db.models import Count, F, Func

    key = f"review:check-counts:{project.pk}"
    hit = cache.get(key)
    if hit is not None:
        return hit
    rows = (reviewable_samples(project).filter(status="rejected", review_status__isnull=True)
            .annotate(name=Func(F("failed_checks"), function="jsonb_array_elements_text"))
            .values("name").annotate(n=Count("id")).order_by("name"))
    out = [(r["name"], r["n"]) for r in rows]
    cache.set(key, out, max_age_s)
    return out
# --- Ingest ---------------------------------------------------------------------------------


def query_page(project: Project, *, split: str = "", search: str = "", after: int | None = None,
               before: int | None = None, limit: int = 50) -> dict:
    """One page of the project's queries, newest first, by keyset pagination on ``id`` (fast at
    any depth over millions of rows: the (project, split, id) and (project, id) indexes).
    ``search``: case-insensitive substring, through the trigram index of QuerySearch once the
    search indexer has caught up with the project's imports, else over the queries themselves
    (complete either way; the index makes it fast over millions of rows).
    ``after``: ids below it (older); ``before``: ids above it (newer). Returns ``{"rows":
    [Query], "older": id | None, "newer": id | None}`` (the cursors for the next links)."""
    from projects.models import Project, Query, QuerySearch

    qs = Query.objects.filter(project=project)
    if split:
        qs = qs.filter(split=split)
    if search:
        versions = Project.objects.filter(pk=project.pk).values_list("search_version", "search_indexed_version").first()
        if versions and versions[1] >= versions[0]:
            matches = QuerySearch.objects.filter(project_id=project.pk, text__icontains=search).values("query_id")
            qs = qs.filter(id__in=matches)
        else:
            qs = qs.filter(text__icontains=search)
    qs = qs.only("id", "text", "split", "reference", "golden", "line", "dataset_id")
    if before is not None:
        rows = list(qs.filter(id__gt=before).order_by("id")[: limit + 1])
        has_more_newer = len(rows) > limit
        rows = rows[:limit][::-1]
        has_more_older = qs.filter(id__lt=rows[-1].id).exists() if rows else False
    else:
        page = qs.filter(id__lt=after) if after is not None else qs
        rows = list(page.order_by("-id")[: limit + 1])
        has_more_older = len(rows) > limit
        rows = rows[:limit]
        has_more_newer = after is not None and bool(rows) and qs.filter(id__gt=rows[0].id).exists()
    return {"rows": rows, "older": rows[-1].id if rows and has_more_older else None,
            "newer": rows[0].id if rows and has_more_newer else None}


def query_split_counts(project: Project) -> dict[str, int]:
    """``{split: number of queries}`` for the project (every split key present)."""
    from django.db.models import Count

    from projects.models import Query, Split

    counts = {s: 0 for s in Split.values}
    for row in Query.objects.filter(project=project).values("split").annotate(n=Count("id")).order_by():
        counts[row["split"]] = row["n"]
    return counts


# --- Evaluation -------------------------------------------------------------------------------


def evaluation_headline(evaluation) -> list[tuple[str, str]]:
    """The overview's headline figures of an evaluation as (label, text): quality retention of
    the best student, its speed-up over the teacher (p50 latency ratio) and its cost per 1K
    queries in USD. Empty when there is no finished evaluation with a student."""
    if evaluation is None or not evaluation.summary.get("best_student"):
        return []
    s = evaluation.summary
    out = [("best student", s["best_student"])]
    if s.get("retention") is not None:
        out.append(("retention", f"{s['retention'] * 100:.1f} %"))
    if s.get("speedup") is not None:
        out.append(("speed-up", f"{s['speedup']:.1f}×"))
    if s.get("cost_per_1k_usd") is not None:
        out.append(("cost per 1K", f"${s['cost_per_1k_usd']:.4f}"))
    return out


def evaluations_for_project(project: Project):
    """The project's evaluations, newest first, with their jobs."""
    from projects.models import Evaluation

    return Evaluation.objects.filter(project=project).select_related("job")


def evaluation_for_user(user, slug: str, evaluation_id: int):
    """Evaluation ``evaluation_id`` of project ``slug`` if one of the user's teams owns it;
    Http404 otherwise."""
    from projects.models import Evaluation

    project = project_for_user(user, slug)
    try:
        return Evaluation.objects.select_related("project", "job").get(pk=evaluation_id, project=project)
    except Evaluation.DoesNotExist:
        raise Http404("No such evaluation") from None


def eval_side_by_side(evaluation, *, student_result_id: int | None = None, disagreements_only: bool = True):
    """Rows for the side-by-side view: one dict per query ``{"query", "reference", "teacher",
    "student", "agree"}`` where teacher/student are EvalPrediction rows (the primary teacher's and
    the chosen student's; default: the best student). Returns ``(rows, student_result,
    teacher_result, students)``; rows is a list (the page paginates it)."""
    from projects.models import EvalPrediction

    results = list(evaluation.results.order_by("id"))
    teacher_name = evaluation.summary.get("teacher")
    teacher = next((r for r in results if r.role == "teacher" and r.model_name == teacher_name),
                   next((r for r in results if r.role == "teacher"), None))
    students = [r for r in results if r.role in ("student", "base")]
    student = next((r for r in students if r.pk == student_result_id), None)
    if student is None and students:
        best = evaluation.summary.get("best_student")
        student = next((r for r in students if r.model_name == best), students[0])
    if teacher is None or student is None:
        return [], student, teacher, students
    t_preds = {p.query_id: p for p in EvalPrediction.objects.filter(result=teacher)}
    rows = []
    for p in EvalPrediction.objects.filter(result=student).select_related("query").order_by("query_id"):
        t = t_preds.get(p.query_id)
        if evaluation.project.task_type == "classification":
            agree = t is not None and p.label == t.label
        else:
            agree = t is not None and (p.output or "").strip() == (t.output or "").strip()
        if disagreements_only and agree:
            continue
        rows.append({"query": p.query, "reference": p.query.reference, "teacher": t, "student": p, "agree": agree})
    return rows, student, teacher, students


# --- Training -------------------------------------------------------------------------------


def training_runs(project: Project):
    """The project's training runs, newest first, with their job."""
    from projects.models import TrainingRun

    return TrainingRun.objects.filter(project=project).select_related("job", "created_by")


def dataset_versions(project: Project) -> list:
    """The project's dataset versions, newest first, each with ``run_ids``: the training runs
    that used it (ids, ascending)."""
    from projects.models import DatasetVersion, TrainingRun

    versions = list(DatasetVersion.objects.filter(project=project).order_by("-number"))
    runs: dict[int, list[int]] = {}
    for vid, rid in (TrainingRun.objects.filter(dataset_version__in=versions).order_by("id")
                     .values_list("dataset_version_id", "id")):
        runs.setdefault(vid, []).append(rid)
    for v in versions:
        v.run_ids = runs.get(v.pk, [])
    return versions


def dataset_version_for_user(user, slug: str, version_id: int):
    """The dataset version ``version_id`` of project ``slug`` if one of the user's teams owns
    it; Http404 otherwise (the same for another team's version as for none)."""
    from projects.models import DatasetVersion

    project = project_for_user(user, slug)
    try:
        return DatasetVersion.objects.select_related("project").get(pk=version_id, project=project)
    except DatasetVersion.DoesNotExist:
        raise Http404("No such dataset version") from None


def training_run_for_user(user, slug: str, run_id: int):
    """The training run ``run_id`` of project ``slug`` if one of the user's teams owns it;
    Http404 otherwise."""
    from projects.models import TrainingRun

    project = project_for_user(user, slug)
    try:
        return TrainingRun.objects.select_related("project", "project__team", "job").get(pk=run_id, project=project)
    except TrainingRun.DoesNotExist:
        raise Http404("No such training run") from None


def training_artifact_for_user(user, slug: str, artifact_id: int):
    """The model artifact ``artifact_id`` of project ``slug`` for a member of its team; Http404 otherwise."""
    from projects.models import ModelArtifact

    project = project_for_user(user, slug)
    try:
        return ModelArtifact.objects.select_related("training_run").get(pk=artifact_id, project=project)
    except ModelArtifact.DoesNotExist:
        raise Http404("No such artifact") from None


def training_metrics(run) -> list[dict]:
    """The run's curve points as plain dicts (``split``, ``step``, ``epoch``, ``loss``,
    ``learning_rate``, ``grad_norm``, ``fidelity``), ordered by step."""
    from projects.models import TrainingMetric

    return list(TrainingMetric.objects.filter(run=run).order_by("step", "split").values(
        "split", "step", "epoch", "loss", "learning_rate", "grad_norm", "fidelity"))


# --- Sweeps ---------------------------------------------------------------------------------


def sweeps(project: Project):
    """The project's hyperparameter sweeps, newest first."""
    from projects.models import Sweep

    return Sweep.objects.filter(project=project).select_related("created_by")


def sweep_for_user(user, slug: str, sweep_id: int):
    """The sweep ``sweep_id`` of project ``slug`` if one of the user's teams owns it; Http404
    otherwise."""
    from projects.models import Sweep

    project = project_for_user(user, slug)
    try:
        return Sweep.objects.select_related("project", "project__team").get(pk=sweep_id, project=project)
    except Sweep.DoesNotExist:
        raise Http404("No such sweep") from None


def sweep_trials(sweep) -> dict:
    """The sweep side by side: ``{"trials": [...], "best": trial or None, "params": [names]}``.
    Each trial: ``trial`` (Optuna's number), ``state`` (Optuna's: RUNNING, COMPLETE, PRUNED,
    FAIL), ``value`` (the objective the study was told: best validation loss), ``params`` (the
    swept hyperparameters), ``run`` (TrainingRun id or None), ``status`` (the run's),
    ``best_val_loss``, ``fidelity`` (validation fidelity at the run's best step, else its last),
    ``train_loss``, ``global_step`` (last logged step), ``stop_reason``. ``best``: the COMPLETE
    trial of lowest value. Reads the Optuna study from the same database."""
    from projects.models import TrainingMetric, TrainingRun
    from projects.services.sweeps import sweep_study

    study = sweep_study(sweep=sweep)
    runs = {r.sweep_trial: r for r in TrainingRun.objects.filter(sweep=sweep)}
    val: dict[int, list] = {}
    for m in TrainingMetric.objects.filter(run__sweep=sweep, split="validation").order_by("step").values(
            "run_id", "step", "fidelity"):
        val.setdefault(m["run_id"], []).append(m)
    rows = []
    for t in study.get_trials(deepcopy=False):
        run = runs.get(t.number)
        fid = None
        if run is not None and val.get(run.pk):
            at_best = [m for m in val[run.pk] if m["step"] == run.best_step]
            fid = (at_best or val[run.pk])[-1]["fidelity"]
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
            "params": dict(t.params), "run": run.pk if run else None, "status": run.status if run else "",
            "best_val_loss": run.best_val_loss if run else None, "fidelity": fid,
            "train_loss": run.train_loss if run else None,
            "global_step": val[run.pk][-1]["step"] if run is not None and val.get(run.pk) else None,
            "stop_reason": (run.stop_reason if run else "") or t.user_attrs.get("stop_reason", ""),
        })
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    best = min(done, key=lambda r: r["value"]) if done else None
    for r in rows:
        r["best"] = best is not None and r["trial"] == best["trial"]
    return {"trials": rows, "best": best, "params": list(sweep.space)}
