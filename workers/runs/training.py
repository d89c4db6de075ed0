"""Training runs, the worker floor: the gpu-queue task's body (build the rows, train, write
metrics and artifacts). Starting, cancelling and resuming a run are request-side writes in
``projects.services.training``.

Validation rows: curated samples (accepted, on train-split queries) are the training rows.
Validation loss and fidelity use samples of the project's *validation*-split queries that the
checks (or a human) accepted, when there are any; otherwise a deterministic hold-out of the train
rows (every 10th row in curated order, ``workers.pipeline.training.split_validation``) is used
and the run's preflight says ``"validation_source": "holdout"``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from django.conf import settings
from django.db.models import Q

from projects import selectors
from projects.models import Job, JobStatus, ModelArtifact, Sample, Split, TrainingMethod, TrainingMetric, TrainingRun
from projects.services import InvalidInput, InvalidState
from projects.services.security import model_ref_resolve
from projects.services.training import _local_teacher, _student_kinds, run_checkpoint_dir, run_output_dir
from workers.pipeline.training import TEACHER_FROM_SAMPLES, TrainingRefused, TrainRow, TrainSpec, split_validation


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


def _accepted(qs):
    return qs.filter(Q(review_status="accepted") | Q(review_status__isnull=True, status="accepted"))


def _rows_from_samples(samples, method: str, labels: list[str]) -> list[TrainRow]:
    """Causal methods: one row per sample (its final answer). classifier-kd: one row per query,
    the label the human gold (Query.reference when it is a label) else the teacher's label, the
    soft labels averaged over the query's samples (an ensemble's members)."""
    if method != "classifier-kd":
        # An API teacher's per-token log-probabilities travel with its own text only: after a
        # human edit they describe tokens the answer no longer has.
        return [TrainRow(query=s.query.text, answer=s.final_response or "",
                         label=s.parsed if isinstance(s.parsed, str) else None,
                         token_logprobs=s.token_logprobs if (method == TrainingMethod.LOGIT_KD and s.token_logprobs
                                                             and s.final_response == s.response) else None)
                for s in samples]
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
        if run.method == TrainingMethod.LOGIT_KD and run.hyperparams.get("teacher") != TEACHER_FROM_SAMPLES:
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
