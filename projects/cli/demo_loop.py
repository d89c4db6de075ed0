"""The demo: the whole loop on the bundled demo project (``demo/``), as ``make demo`` and
``distill demo`` run it.

It creates (or reuses) the demo team, an owner user and the demo project, imports the queries and
the golden set, adds a teacher (the bundled SmolLM2 through ``transformers``, or an
OpenAI-compatible endpoint when ``OPENAI_API_KEY`` is set), runs generation, trains two students
(``classifier-kd`` on MiniLM and ``sft-lora`` on SmolLM2, preset ``fast``) and evaluates them
against the teacher. Every stage runs as a Job on the Celery workers; this function queues it,
waits for it and reports progress. A stage that already succeeded in an earlier run is reused
unless ``rerun`` is set, so running the demo again is quick and shows the same project.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

from distillhub.secret_files import read_or_create_secret

from projects.models import (
    Evaluation,
    GenerationRun,
    Job,
    JobStatus,
    Project,
    Team,
    Teacher,
    TrainingRun,
)
from projects.services import InvalidState, ServiceError

DEMO_DIR = Path(settings.BASE_DIR) / "demo"
DEMO_TEAM = "DistillHub Demo"
DEMO_TEAM_SLUG = "distillhub-demo"
DEMO_USER = "demo"
DEMO_PROJECT = "Support intents (demo)"
LOCAL_TEACHER = "smollm2-local"
OPENAI_TEACHER = "openai"
STUDENTS = (("classifier-kd", "minilm-l6"), ("sft-lora", "smollm2-135m-instruct"))
# gpt-4o-mini list prices, USD per 1M tokens (input, output); used for the OpenAI teacher's cost.
OPENAI_PRICES = {"gpt-4o-mini": (0.15, 0.60)}
# Train queries sent to the teacher: keeps the loop under 15 minutes on two CPU cores
# (the bundled teacher scores the labels at about 0.6 s per query there).
DEFAULT_GENERATION_LIMIT = 240


def demo_password() -> str:
    """The demo user's password: ``DISTILLHUB_DEMO_PASSWORD`` when set, else one generated once
    and kept in ``<data dir>/demo_password`` (mode 0600) so every run prints the same login."""
    env = os.environ.get("DISTILLHUB_DEMO_PASSWORD")
    if env:
        return env
    return read_or_create_secret(Path(settings.DATA_DIR) / "demo_password", nbytes=12)


def dashboard_url(*, project: Project | None = None) -> str:
    """The dashboard's URL (``DISTILLHUB_URL``, default http://127.0.0.1:8000), or the project's
    overview page under it."""
    base = os.environ.get("DISTILLHUB_URL", "http://127.0.0.1:8000").rstrip("/")
    return f"{base}/p/{project.slug}/" if project is not None else f"{base}/"


def _workers_answering(timeout_s: float = 3.0) -> list[str]:
    from distillhub.celery import app

    try:
        replies = app.control.ping(timeout=timeout_s) or []
    except Exception:  # broker unreachable: no worker either
        return []
    return [name for reply in replies for name in reply]


def demo_wait(*, job: Job, report: Callable[[str], None], label: str, poll_s: float = 1.0,
              timeout_s: float = 3600.0) -> Job:
    """Poll ``job`` until it ends, calling ``report`` with a progress line whenever its progress
    (to the whole percent) or message changes. Returns the ended Job. Raises InvalidState when it
    has not ended after ``timeout_s`` seconds (the job keeps running; cancel it with
    ``distill job ID --cancel``)."""
    start = time.monotonic()
    last = None
    warned = False
    while True:
        job.refresh_from_db()
        line = f"  {label}: {job.get_status_display().lower()} {job.progress * 100:3.0f} % {job.message}".rstrip()
        if line != last:
            report(line)
            last = line
        if job.ended:
            return job
        waited = time.monotonic() - start
        if job.status == JobStatus.QUEUED and waited > 60 and not warned:
            report(f"  {label}: still queued after 60 s; is a Celery worker consuming the default, teacher and gpu queues?")
            warned = True
        if waited > timeout_s:
            raise InvalidState(f"{label}: job {job.pk} did not end within {timeout_s:.0f} s (still {job.status})")
        time.sleep(poll_s)


def _setup(*, report: Callable[[str], None]) -> tuple[Team, object, str, Project]:
    from projects.services.projects import project_create
    from projects.services.teams import team_create, user_create

    team = Team.objects.filter(slug=DEMO_TEAM_SLUG).first() or team_create(name=DEMO_TEAM)
    password = demo_password()
    user = user_create(username=DEMO_USER, team=team, role="owner", password=password, update=True)
    # Found by team and name: the slug is derived from the name (support-intents-demo) but gets a
    # suffix when another team already uses it.
    project = Project.objects.filter(team=team, name=DEMO_PROJECT).order_by("created_at").first()
    if project is None:
        labels = [l.strip() for l in (DEMO_DIR / "labels.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
        project = project_create(team=team, user=user, name=DEMO_PROJECT, task_type="classification",
                                 labels=labels, instructions=(DEMO_DIR / "instructions.txt").read_text(encoding="utf-8"))
        report(f"Created project “{project.name}” ({project.slug}) in team “{team.name}”.")
    else:
        report(f"Using project “{project.name}” ({project.slug}) in team “{team.name}”.")
    return team, user, password, project


def _import(*, project: Project, user, report: Callable[[str], None]) -> dict:
    from workers.runs.ingest import dataset_import

    out = {}
    for name, golden in (("queries.csv", False), ("golden.csv", True)):
        if project.queries.filter(golden=golden).exists():
            n = project.queries.filter(golden=golden).count()
            report(f"Queries: {n} {'golden ' if golden else ''}queries already imported.")
            out["golden" if golden else "queries"] = {"imported": n, "duplicates": 0, "skipped": [], "reused": True}
            continue
        ds = dataset_import(project=project, file_path=str(DEMO_DIR / name), filename=name, user=user,
                            text_column="text", reference_column="reference", golden=golden)
        report(f"Queries: imported {ds.imported} from {name} ({ds.duplicates} duplicates, {len(ds.skipped or [])} skipped).")
        out["golden" if golden else "queries"] = {"imported": ds.imported, "duplicates": ds.duplicates,
                                                 "skipped": ds.skipped, "reused": False}
    splits = {s: project.queries.filter(golden=False, split=s).count() for s in ("train", "validation", "test")}
    out["splits"] = splits
    report(f"Queries: split {splits['train']} train / {splits['validation']} validation / {splits['test']} test (held out).")
    return out


def _teacher(*, project: Project, user, openai_key_env: str, report: Callable[[str], None]) -> Teacher:
    from projects.services.generation import teacher_create

    if os.environ.get(openai_key_env):
        model = os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
        base_url = os.environ.get("OPENAI_BASE_URL", "")
        price_in, price_out = OPENAI_PRICES.get(model, (0, 0))
        teacher = project.teachers.filter(provider="openai", model=model, base_url=base_url,
                                          api_key_env=openai_key_env).order_by("created_at").first()
        if teacher is None:
            taken = set(project.teachers.values_list("name", flat=True))
            name = OPENAI_TEACHER if OPENAI_TEACHER not in taken else f"{OPENAI_TEACHER}-{len(taken) + 1}"
            teacher = teacher_create(project=project, user=user, name=name, provider="openai", model=model,
                                     base_url=base_url, api_key_env=openai_key_env, temperature=0.0,
                                     max_tokens=16, top_logprobs=5, price_in_per_1m=price_in,
                                     price_out_per_1m=price_out)
        report(f"Teacher: {teacher.name} ({model} at {base_url or 'api.openai.com'}; key from ${openai_key_env}).")
        return teacher
    teacher = project.teachers.filter(name=LOCAL_TEACHER).first()
    if teacher is None:
        teacher = teacher_create(project=project, user=user, name=LOCAL_TEACHER, provider="transformers",
                                 model="smollm2-135m-instruct", temperature=0.0, max_tokens=16)
    report(f"Teacher: {teacher.name} (bundled SmolLM2-135M-Instruct, local transformers; "
           f"set {openai_key_env} to use an OpenAI-compatible endpoint instead).")
    return teacher


def _finished(qs, rerun: bool):
    """The newest succeeded row of ``qs`` (by its job), unless ``rerun``."""
    if rerun:
        return None
    return qs.filter(job__status=JobStatus.SUCCEEDED).order_by("-created_at").first()


def demo_run(*, report: Callable[[str], None] = print, openai_key_env: str = "OPENAI_API_KEY",
             generation_limit: int | None = DEFAULT_GENERATION_LIMIT, rerun: bool = False,
             students: tuple[tuple[str, str], ...] = STUDENTS, preset: str = "fast",
             stage_timeout_s: float = 3600.0, report_summary: bool = True) -> dict:
    """Run the whole loop on the demo project and return its summary.

    ``report``: called with one human-readable line per step and progress change.
    ``openai_key_env``: when this environment variable is set, the teacher is an OpenAI-compatible
    endpoint (``OPENAI_BASE_URL`` if set, model ``OPENAI_MODEL``, default gpt-4o-mini); otherwise
    the bundled SmolLM2 runs locally. ``generation_limit``: train queries sent to the teacher
    (None: all). ``rerun``: run generation, training and evaluation again even when an earlier
    demo run finished them. ``students``: (method, student model) pairs to train. ``preset``: the
    training preset. ``stage_timeout_s``: longest wait for one job, seconds. ``report_summary``:
    also pass the summary table to ``report`` at the end.

    Returns ``{"team", "project", "url", "login": {"username", "password", "url"}, "imports",
    "teacher", "generation": {...}, "training": [{...}], "evaluation": {...}, "summary": [{"model",
    "role", "quality", "quality_retention", "speedup", "latency_ms_p50", "cost_per_1k_usd"}]}``;
    quality is the task metric (accuracy) in [0, 1], retention = student / teacher quality,
    speed-up = teacher p50 latency / model p50 latency, cost in USD per 1,000 queries.

    Raises InvalidState when no Celery worker answers, when generation or the evaluation fails, or
    when every student fails; ServiceError from the stage services on bad data."""
    try:
        from projects.services.evaluation import evaluation_start
        from projects.services.generation import generation_start
        from projects.services.training import training_start
    except ImportError as exc:  # a checkout without one of the stages
        raise InvalidState(f"this checkout lacks a stage of the loop ({exc.name}); the demo needs all of them") from None

    # Workers started a moment ago (scripts/demo.sh) take a few seconds to answer.
    deadline = time.monotonic() + 45
    while not _workers_answering():
        if time.monotonic() > deadline:
            raise InvalidState("no Celery worker answers: start one with `make worker` (or `make demo` starts them)")
        report("Waiting for a Celery worker to answer…")

    team, user, password, project = _setup(report=report)
    result: dict = {"team": team.slug, "project": project.slug, "url": dashboard_url(project=project),
                    "login": {"username": user.username, "password": password, "url": dashboard_url()}}
    result["imports"] = _import(project=project, user=user, report=report)
    teacher = _teacher(project=project, user=user, openai_key_env=openai_key_env, report=report)
    result["teacher"] = {"name": teacher.name, "provider": teacher.provider, "model": teacher.model,
                         "base_url": teacher.base_url}

    # Generation: the teacher answers the train queries; the checks accept or reject each answer.
    # The evaluation's own teacher runs (options.split "test"/"golden") are not training data.
    run = _finished(GenerationRun.objects.filter(project=project, teachers=teacher, options__split="train"), rerun)
    if run is not None:
        report(f"Generation: reusing run {run.pk} ({run.accepted} accepted, {run.rejected} rejected).")
    else:
        # A local teacher shares the worker's CPU cores: more requests in flight than cores only
        # makes the threads fight over them. An API teacher gets the usual 16.
        concurrency = 2 if teacher.provider == "transformers" else 16
        run = generation_start(project=project, user=user, teachers=[teacher], limit=generation_limit,
                               concurrency=concurrency)
        report(f"Generation: run {run.pk} queued (job {run.job_id}), teacher {teacher.name}, "
               f"{'all' if generation_limit is None else f'up to {generation_limit}'} train queries.")
        job = demo_wait(job=run.job, report=report, label="generation", timeout_s=stage_timeout_s)
        run.refresh_from_db()
        if job.status != JobStatus.SUCCEEDED:
            raise InvalidState(f"generation job {job.pk} ended {job.status}: {job.error or job.message}")
    result["generation"] = {"run": run.pk, "job": run.job_id, "status": run.job.status if run.job else run.status,
                            "accepted": run.accepted, "rejected": run.rejected, "failed": run.failed,
                            "input_tokens": run.input_tokens, "output_tokens": run.output_tokens,
                            "cost_usd": float(run.cost_usd)}
    report(f"Generation: {run.accepted} accepted, {run.rejected} rejected, {run.failed} failed; "
           f"{run.input_tokens + run.output_tokens} tokens, ${float(run.cost_usd):.4f}.")

    # Students, one after the other (two CPU cores: training them side by side is no faster).
    result["training"] = []
    for method, student in students:
        # Reused only when trained on this generation's data (not an earlier teacher's).
        tr = _finished(TrainingRun.objects.filter(project=project, method=method, student_model=student,
                                                  created_at__gt=run.created_at), rerun)
        if tr is not None:
            report(f"Training {method} on {student}: reusing run {tr.pk} (train loss {tr.train_loss}).")
        else:
            try:
                tr = training_start(project=project, user=user, method=method, student_model=student, preset=preset)
            except ServiceError as exc:
                report(f"Training {method} on {student}: not started: {exc}")
                result["training"].append({"method": method, "student": student, "status": "not started", "error": str(exc)})
                continue
            report(f"Training {method} on {student}: run {tr.pk} queued (job {tr.job_id}), preset {preset}.")
            job = demo_wait(job=tr.job, report=report, label=f"training {method}", timeout_s=stage_timeout_s)
            tr.refresh_from_db()
            if job.status != JobStatus.SUCCEEDED:
                report(f"Training {method} on {student}: ended {job.status}: {job.error or job.message}")
        result["training"].append({"run": tr.pk, "job": tr.job_id, "method": method, "student": student,
                                   "status": tr.job.status if tr.job else tr.status, "train_loss": tr.train_loss,
                                   "best_val_loss": tr.best_val_loss,
                                   "artifacts": [{"kind": a.kind, "path": a.path, "size_bytes": a.size_bytes}
                                                 for a in tr.artifacts.all()]})
    if not any(t.get("status") == JobStatus.SUCCEEDED for t in result["training"]):
        raise InvalidState("every student failed to train; see the Jobs page or `distill job ID`")

    # Evaluation: students vs teacher on the held-out test split. Reused only when it is newer
    # than every student it should include.
    newest_training = max(TrainingRun.objects.filter(project=project).values_list("created_at", flat=True))
    ev = _finished(Evaluation.objects.filter(project=project, split="test", created_at__gt=newest_training), rerun)
    if ev is not None:
        report(f"Evaluation: reusing evaluation {ev.pk}.")
    else:
        ev = evaluation_start(project=project, user=user, split="test")
        report(f"Evaluation: {ev.pk} queued (job {ev.job_id}) on the held-out test split.")
        job = demo_wait(job=ev.job, report=report, label="evaluation", timeout_s=stage_timeout_s)
        ev.refresh_from_db()
        if job.status != JobStatus.SUCCEEDED:
            raise InvalidState(f"evaluation job {job.pk} ended {job.status}: {job.error or job.message}")
    result["evaluation"] = {"evaluation": ev.pk, "job": ev.job_id, "split": ev.split, "verdict": ev.verdict,
                            "ready_to_ship": ev.ready_to_ship, "headline": ev.summary,
                            "url": dashboard_url(project=project) + "evaluation/"}
    result["summary"] = demo_summary(evaluation=ev)
    if report_summary:
        report("")
        report(demo_summary_text(result=result))
    return result


def demo_summary(*, evaluation: Evaluation) -> list[dict]:
    """One dict per evaluated model: ``model``, ``role``, ``quality`` (task metric in [0, 1]),
    ``quality_retention`` (student quality / teacher quality), ``speedup`` (teacher p50 latency /
    this model's p50 latency; None without latencies), ``latency_ms_p50`` (ms) and
    ``cost_per_1k_usd`` (USD per 1,000 queries). Teachers first."""
    results = list(evaluation.results.all().order_by("id"))
    teacher_lat = next((r.latency_ms_p50 for r in results if r.role == "teacher" and r.latency_ms_p50), None)
    rows = []
    for r in sorted(results, key=lambda r: (r.role != "teacher", r.id)):
        speedup = (teacher_lat / r.latency_ms_p50) if (teacher_lat and r.latency_ms_p50) else None
        rows.append({"model": r.model_name, "role": r.role, "quality": r.quality,
                     "quality_retention": r.quality_retention, "speedup": speedup,
                     "latency_ms_p50": r.latency_ms_p50, "cost_per_1k_usd": r.cost_per_1k_usd})
    return rows


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def demo_summary_text(*, result: dict) -> str:
    """The summary as a small table plus the dashboard URL and login, for people."""
    lines = ["Summary (held-out test split)", f"{'model':<44} {'role':<8} {'quality':>8} {'retention':>9} "
             f"{'speed-up':>8} {'p50 ms':>8} {'$/1K q':>8}"]
    for r in result.get("summary", []):
        lines.append(f"{r['model'][:44]:<44} {r['role']:<8} {_fmt(r['quality'], '.1%'):>8} "
                     f"{_fmt(r['quality_retention'], '.1%'):>9} {_fmt(r['speedup'], '.1f', '×'):>8} "
                     f"{_fmt(r['latency_ms_p50'], '.1f'):>8} {_fmt(r['cost_per_1k_usd'], '.4f'):>8}")
    ev = result.get("evaluation", {})
    if ev.get("verdict"):
        lines.append(f"Verdict: {ev['verdict']}")
    login = result["login"]
    lines += ["", f"Dashboard: {result['url']}",
              f"Log in at {login['url']}login/ as {login['username']} with password {login['password']}"]
    return "\n".join(lines)
