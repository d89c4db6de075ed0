"""Training runs: start one from the curated dataset, run it (the gpu-queue task's body),
cancel it, resume it from its last checkpoint.

Validation rows: curated samples (accepted, on train-split queries) are the training rows.
Validation loss and fidelity use samples of the project's *validation*-split queries that the
checks (or a human) accepted, when there are any; otherwise a deterministic hold-out of the train
rows (every 10th row in curated order, ``workers.pipeline.training.split_validation``) is used
and the run's preflight says ``"validation_source": "holdout"``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from projects import selectors
from projects.models import (JOB_ENDED, Job, JobStatus, ModelArtifact, Project, Sample, Split, Teacher,
                             TrainingMethod, TrainingMetric, TrainingRun)
from projects.services import InvalidInput, InvalidState
from projects.services.idempotency import idempotency_key_parse, start_find_earlier
from projects.services.jobs import job_cancel, job_create, job_enqueue
from projects.services.permissions import ensure_can_write
from projects.services.security import model_ref_check, model_ref_resolve
from workers.pipeline import prompts
from workers.pipeline.training import (DEFAULT_STUDENT, METHODS, PRESETS, TrainingRefused, TrainRow, TrainSpec,
                                       resolve_hyperparams, split_validation)

JOB_KIND = "training"


def run_output_dir(*, run: TrainingRun) -> Path:
    """``MEDIA_ROOT/artifacts/<project-slug>/run-<id>``: artifacts, served by the default storage."""
    return Path(settings.MEDIA_ROOT) / "artifacts" / run.project.slug / f"run-{run.pk}"


def run_checkpoint_dir(*, run: TrainingRun) -> Path:
    """``DATA_DIR/checkpoints/<project-slug>/run-<id>``: Trainer checkpoints (not served)."""
    return Path(settings.DATA_DIR) / "checkpoints" / run.project.slug / f"run-{run.pk}"


def path_digest(*, path: Path) -> tuple[int, str]:
    """Size in bytes and sha256 of a file, or of a folder: for a folder the sha256 is taken
    over its manifest, the lines ``"<relative path>\\t<file sha256>\\n"`` of every file sorted by
    relative path (POSIX separators), and the size is the sum of the files' sizes."""

    def file_sha(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if path.is_file():
        return path.stat().st_size, file_sha(path)
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    manifest = hashlib.sha256()
    size = 0
    for p in files:
        size += p.stat().st_size
        manifest.update(f"{p.relative_to(path).as_posix()}\t{file_sha(p)}\n".encode())
    return size, manifest.hexdigest()


def _local_teacher(project: Project, name: str) -> Teacher:
    teachers = Teacher.objects.filter(project=project, provider=Teacher.Provider.TRANSFORMERS)
    if name:
        t = teachers.filter(name=name).first()
        if t is None:
            raise InvalidInput(f"teacher: {name!r} is not a local (transformers) teacher of this project")
        return t
    t = teachers.order_by("id").first()
    if t is None:
        raise InvalidInput("logit-kd needs a local (transformers) teacher in this project, whose token "
                           "distributions the student learns; with an API teacher use sft-lora")
    return t


def _student_kinds(method: str) -> tuple[str, ...]:
    return ("classifier",) if method == TrainingMethod.CLASSIFIER_KD else ("merged",)


def training_start(*, project: Project, method: str, student_model: str = "", user=None, preset: str = "fast",
                   overrides: dict | None = None, idempotency_key=None) -> TrainingRun:
    """Create a TrainingRun and its Job, and queue ``training_run_task`` on the ``gpu`` queue
    after commit. ``overrides``: hyperparameters that replace the preset's (see
    ``workers.pipeline.training.PRESETS``). The curated dataset's sha256 and row count, every
    hyperparameter used and both prompt templates are stored on the run.

    ``student_model``: a bundled name, a Hugging Face id ``org/name``, ``artifact:<id>`` (a
    ``merged`` artifact of THIS project for the causal methods, a ``classifier`` one for
    classifier-kd) or a folder under ``DISTILLHUB_MODEL_DIRS``; blank: the method's default.

    Double submits (see ``projects.services.idempotency``): the run created with
    ``idempotency_key`` (a UUID from the Train form) is returned when there is one, else a run
    with the same method, student, preset, hyperparameters and curated dataset whose job is
    still queued or running; the returned run's ``reused`` says which happened.

    Raises NotAllowed (viewer), InvalidInput (unknown method/preset/setting, a refused student
    model, classifier-kd on a non-classification project, logit-kd without a local teacher),
    InvalidState (no curated rows).
    """
    ensure_can_write(user=user, team=project.team)
    if method not in METHODS:
        raise InvalidInput(f"method: {method!r} is not one of {', '.join(METHODS)}")
    try:
        hp = resolve_hyperparams(method, preset, overrides)
    except TrainingRefused as exc:
        raise InvalidInput(str(exc)) from None
    student_model = (student_model or "").strip() or DEFAULT_STUDENT[method]
    if len(student_model) > 300:
        raise InvalidInput(f"student_model: at most 300 characters, got {len(student_model)}")
    student_model = model_ref_check(project=project, ref=student_model, field="student_model",
                                    kinds=_student_kinds(method))
    if method == TrainingMethod.CLASSIFIER_KD and (project.task_type != "classification" or len(project.labels) < 2):
        raise InvalidInput("method: classifier-kd needs a classification project with at least two labels; "
                           "use sft-lora for this task")
    if method == TrainingMethod.LOGIT_KD:
        hp["teacher"] = _local_teacher(project, hp.get("teacher", "")).name
    sha, n = selectors.curated_dataset_sha256(project)
    if n == 0:
        raise InvalidState("the curated dataset is empty: generate teacher data (and review it) before training")
    spec = selectors.project_task_spec(project)
    key = idempotency_key_parse(key=idempotency_key)
    hp_stored = json.loads(json.dumps(hp))  # as the jsonb column gives it back (tuples -> lists)

    def same(r: TrainingRun) -> bool:
        return (r.method, r.student_model, r.preset, r.dataset_sha256, r.hyperparams) == (
            method, student_model, preset, sha, hp_stored)

    with transaction.atomic():
        earlier = start_find_earlier(model=TrainingRun, project=project, key=key, same=same)
        if earlier is not None:
            earlier.reused = True
            return earlier
        job = job_create(kind=JOB_KIND, team=project.team, project=project, user=user)
        run = TrainingRun.objects.create(
            project=project, job=job, method=method, student_model=student_model, preset=preset,
            hyperparams=hp, dataset_sha256=sha, dataset_rows=n,
            student_prompt_template=prompts.student_template(spec) if method != "classifier-kd" else "{query}",
            teacher_prompt_template=prompts.teacher_template(spec),
            created_by=user if (user is not None and user.is_authenticated) else None, idempotency_key=key,
        )
        run.output_dir = str(run_output_dir(run=run))
        run.save(update_fields=["output_dir"])
        job.payload = {"run_id": run.pk, "resume_from_checkpoint": None}
        job.save(update_fields=["payload"])
        _enqueue(job)
    run.reused = False
    return run


def _enqueue(job: Job) -> None:
    from workers.tasks import training_run_task

    job_enqueue(job=job, task=training_run_task, queue="gpu")


def training_cancel(*, run: TrainingRun, user=None) -> TrainingRun:
    """Ask a queued or running run to stop (its trainer checks after every step, so it stops
    within seconds). Raises NotAllowed for viewers, InvalidState when it has ended."""
    if run.job is None or run.job.status in JOB_ENDED:
        raise InvalidState(f"training run {run.pk} is not running")
    job_cancel(job=run.job, user=user)
    run.refresh_from_db()
    return run


def latest_checkpoint(*, run: TrainingRun) -> str | None:
    """The newest ``checkpoint-<step>`` folder of the run, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    d = run_checkpoint_dir(run=run)
    return get_last_checkpoint(str(d)) if d.is_dir() else None


def training_resume(*, run: TrainingRun, user=None) -> TrainingRun:
    """Re-queue a failed or cancelled run (e.g. its worker was killed) from its last checkpoint
    (``resume_from_checkpoint``): a new Job on the same run; metrics already logged are kept.

    Raises NotAllowed for viewers, InvalidState when the run is queued/running/succeeded or
    has no checkpoint yet (start a new run then)."""
    ensure_can_write(user=user, team=run.project.team)
    if run.job is not None and run.job.status not in JOB_ENDED:
        raise InvalidState(f"training run {run.pk} is still {run.job.status}")
    if run.status == JobStatus.SUCCEEDED:
        raise InvalidState(f"training run {run.pk} has already succeeded")
    ckpt = latest_checkpoint(run=run)
    if ckpt is None:
        raise InvalidState(f"training run {run.pk} has no checkpoint to resume from; start a new run")
    with transaction.atomic():
        job = job_create(kind=JOB_KIND, team=run.project.team, project=run.project, user=user,
                         payload={"run_id": run.pk, "resume_from_checkpoint": ckpt})
        TrainingRun.objects.filter(pk=run.pk).update(job=job, status=JobStatus.QUEUED, stop_reason="", finished_at=None)
        _enqueue(job)
    run.refresh_from_db()
    return run


def _sync_run(job: Job) -> None:
    run = TrainingRun.objects.filter(job=job).first()
    if run is None:
        return
    fields = {"status": job.status, "finished_at": job.finished_at or timezone.now()}
    if job.status == JobStatus.CANCELLED and not run.stop_reason:
        fields["stop_reason"] = "cancelled by user"
    elif job.status == JobStatus.FAILED and not run.stop_reason:
        fields["stop_reason"] = (job.error or job.message).strip().splitlines()[0][:300] if (job.error or job.message) else "failed"
    TrainingRun.objects.filter(pk=run.pk).update(**fields)


# --- rows -----------------------------------------------------------------------------------


def _accepted(qs):
    return qs.filter(Q(review_status="accepted") | Q(review_status__isnull=True, status="accepted"))


def _rows_from_samples(samples, method: str, labels: list[str]) -> list[TrainRow]:
    """Causal methods: one row per sample (its final answer). classifier-kd: one row per query,
    the label the human gold (Query.reference when it is a label) else the teacher's label, the
    soft labels averaged over the query's samples (an ensemble's members)."""
    if method != "classifier-kd":
        return [TrainRow(query=s.query.text, answer=s.final_response or "",
                         label=s.parsed if isinstance(s.parsed, str) else None) for s in samples]
    by_query: dict[int, list[Sample]] = {}
    for s in samples:
        by_query.setdefault(s.query_id, []).append(s)
    rows = []
    for group in by_query.values():
        q = group[0].query
        probs: dict[str, float] = {}
        with_probs = [s.label_probs for s in group if isinstance(s.label_probs, dict) and s.label_probs]
        for lp in with_probs:
            for k, v in lp.items():
                probs[k] = probs.get(k, 0.0) + float(v) / len(with_probs)
        votes: dict[str, int] = {}
        for s in group:
            if isinstance(s.parsed, str) and s.parsed in labels:
                votes[s.parsed] = votes.get(s.parsed, 0) + 1
        teacher_label = max(probs, key=probs.get) if probs else (max(votes, key=votes.get) if votes else None)
        gold = q.reference if q.reference in labels else None
        rows.append(TrainRow(query=q.text, answer=gold or teacher_label or "", label=gold or teacher_label,
                             teacher_label=teacher_label, label_probs=probs or None))
    return rows


def training_rows(*, run: TrainingRun) -> tuple[list[TrainRow], list[TrainRow], str]:
    """(train rows, validation rows, validation source: ``validation-split`` or ``holdout``)."""
    project = run.project
    labels = list(project.labels or [])
    train = _rows_from_samples(list(selectors.curated_samples(project)), run.method, labels)
    val_qs = _accepted(Sample.objects.filter(run__project=project, query__split=Split.VALIDATION, query__golden=False)
                       ).select_related("query").order_by("id")
    val = _rows_from_samples(list(val_qs), run.method, labels)
    if val:
        return train, val, "validation-split"
    train, val = split_validation(train)
    return train, val, "holdout"


# --- the task body --------------------------------------------------------------------------


def training_execute(*, job: Job, reporter) -> dict:
    """Run the training job ``job`` (called by the gpu-queue task through ``run_job``): build
    rows, train, write TrainingMetric rows through the report callback, then ModelArtifact rows
    with size and sha256. Returns the job's result ``{"run", "train_loss", "best_val_loss",
    "artifacts": [...], ...}``. Raises what the pipeline raises (the job fails with its message)."""
    from workers.pipeline.training import TrainingStopped, train

    run = TrainingRun.objects.select_related("project").get(pk=job.payload["run_id"])
    resume = job.payload.get("resume_from_checkpoint")
    TrainingRun.objects.filter(pk=run.pk).update(status=JobStatus.RUNNING)
    # Checked again here, right before loading: a row that somehow holds a free path or another
    # project's artifact is refused (the run fails with the reason), never loaded.
    try:
        student, policy = model_ref_resolve(project=run.project, ref=run.student_model, field="student_model",
                                            kinds=_student_kinds(run.method))
        teacher_model = None
        if run.method == TrainingMethod.LOGIT_KD:
            teacher_model, tpolicy = model_ref_resolve(
                project=run.project, ref=_local_teacher(run.project, run.hyperparams.get("teacher", "")).model,
                field="teacher model", kinds=("merged",))
            policy = policy.with_model_dirs(*tpolicy.model_dirs)
    except (InvalidInput, InvalidState) as exc:
        TrainingRun.objects.filter(pk=run.pk).update(stop_reason=str(exc)[:300])
        raise TrainingRefused(str(exc)) from None
    train_rows, val_rows, val_source = training_rows(run=run)
    spec = TrainSpec(method=run.method, student_model=student, task=selectors.project_task_spec(run.project),
                     train_rows=train_rows, val_rows=val_rows, hyperparams=dict(run.hyperparams),
                     output_dir=str(run_output_dir(run=run)), checkpoint_dir=str(run_checkpoint_dir(run=run)),
                     resume_from_checkpoint=resume, teacher_model=teacher_model,
                     cache_dir=str(settings.MODEL_CACHE_DIR), policy=policy)

    def report(event: str, data: dict) -> None:
        if event == "metric":
            TrainingMetric.objects.update_or_create(
                run=run, step=int(data["step"]), split=data["split"],
                defaults={k: data.get(k) for k in ("epoch", "loss", "learning_rate", "grad_norm", "fidelity")})
            reporter.report()
        elif event == "preflight":
            pf = {**data, "validation_source": val_source, "train_rows": len(train_rows),
                  "resume_from_checkpoint": resume}
            TrainingRun.objects.filter(pk=run.pk).update(preflight=pf)
            reporter.report(message="preflight passed" if data.get("ok") else "preflight refused", force=True)
        elif event == "progress":
            reporter.report(data.get("progress"), data.get("message"))

    try:
        result = train(spec, report=report, check_stop=reporter.check_cancel)
    except (TrainingRefused, TrainingStopped) as exc:
        TrainingRun.objects.filter(pk=run.pk).update(stop_reason=str(exc)[:300])
        raise
    artifacts = []
    media = Path(settings.MEDIA_ROOT)
    for a in result.artifacts:
        p = Path(a["path"])
        size, sha = path_digest(path=p)
        rel = os.path.relpath(p, media)
        ModelArtifact.objects.update_or_create(training_run=run, kind=a["kind"], defaults={
            "project": run.project, "path": rel, "size_bytes": size, "sha256": sha})
        artifacts.append({"kind": a["kind"], "path": rel, "size_bytes": size, "sha256": sha})
    TrainingRun.objects.filter(pk=run.pk).update(
        train_loss=result.train_loss, best_val_loss=result.best_val_loss, best_step=result.best_step,
        stop_reason=result.stop_reason, preflight={**result.preflight, "validation_source": val_source,
                                                   "train_rows": len(train_rows), "resume_from_checkpoint": resume})
    return {"run": run.pk, "train_loss": result.train_loss, "best_val_loss": result.best_val_loss,
            "best_step": result.best_step, "global_step": result.global_step, "stop_reason": result.stop_reason,
            "resumed_from_step": result.resumed_from_step, "artifacts": artifacts,
            "message": f"Trained {result.global_step} steps; train loss {result.train_loss:.4f}"
            if result.train_loss is not None else f"Trained {result.global_step} steps"}


def presets_table() -> dict:
    """``{method: {preset: hyperparams}}`` for the Train form."""
    return PRESETS
