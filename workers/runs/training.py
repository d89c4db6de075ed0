"""Training runs, the worker floor: the gpu-queue task's body (build the rows, train, write
metrics and artifacts). Starting, cancelling and resuming a run are request-side writes in
``projects.services.training``.

Training rows: the run's frozen dataset version (the curated samples, accepted on train-split
queries, as they were when the run started).
Validation loss and fidelity use samples of the project's *validation*-split queries that the
checks (or a human) accepted, when there are any; otherwise a deterministic hold-out of the train
rows (every 10th row in curated order, ``workers.pipeline.training.split_validation``) is used
and the run's preflight says ``"validation_source": "holdout"``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db.models import Q

from projects import selectors
from projects.models import DatasetVersion, Job, JobStatus, ModelArtifact, Sample, Split, TrainingMethod, TrainingMetric, TrainingRun
from projects.services import InvalidInput, InvalidState
from projects.services.datasets import dataset_version_file
from projects.services.security import model_ref_resolve
from projects.services.training import (_local_teacher, _student_kinds, run_checkpoint_dir, run_output_dir,
                                        teacher_tune_register)
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


@dataclass
class _Item:
    """One curated answer, from a Sample or a row of a frozen dataset version: ``query_key``
    groups a query's answers (classifier-kd); ``reference`` is the query's gold answer or label."""

    query_key: object
    query: str
    reference: str | None
    answer: str
    label: str | None
    label_probs: dict | None
    token_logprobs: list | None = None


def _own_logprobs(token_logprobs, response: str | None, answer: str | None):
    """An API teacher's per-token log-probabilities travel with its own text only: after a human
    edit they describe tokens the answer no longer has."""
    return token_logprobs if token_logprobs and answer == response else None


def _items_from_samples(samples) -> list[_Item]:
    return [_Item(query_key=s.query_id, query=s.query.text, reference=s.query.reference, answer=s.final_response or "",
                  label=s.parsed if isinstance(s.parsed, str) else None, label_probs=s.label_probs,
                  token_logprobs=_own_logprobs(s.token_logprobs, s.response, s.final_response)) for s in samples]


def _items_from_version(version: DatasetVersion) -> list[_Item]:
    """The rows of a frozen dataset version (hf-jsonl, see ``projects.selectors.curated_export_lines``),
    checked against its sha256 while read. Raises InvalidState when its file is missing or changed."""
    path = dataset_version_file(version=version)
    h = hashlib.sha256()
    rows = []
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            rows.append(json.loads(line))
    if h.hexdigest() != version.sha256:
        raise InvalidState(f"dataset version {version.pk}: its file no longer matches sha256 {version.sha256}")
    src = {i: (ref, lp, resp) for i, ref, lp, resp in Sample.objects.filter(id__in=[r["sample_id"] for r in rows])
           .values_list("id", "query__reference", "token_logprobs", "response")}
    none = (None, None, None)
    return [_Item(query_key=r["query"], query=r["query"], reference=src.get(r["sample_id"], none)[0], answer=r["answer"],
                  label=r["label"], label_probs={p["label"]: p["prob"] for p in r["label_probs"]} or None,
                  token_logprobs=_own_logprobs(src.get(r["sample_id"], none)[1], src.get(r["sample_id"], none)[2],
                                               r["answer"]))
            for r in rows]


def _rows_from_samples(samples, method: str, labels: list[str]) -> list[TrainRow]:
    return _rows_from_items(_items_from_samples(samples), method, labels)


def _rows_from_items(items: list[_Item], method: str, labels: list[str]) -> list[TrainRow]:
    """Causal methods: one row per answer (its final text). classifier-kd: one row per query,
    the label the human gold (the query's reference when it is a label) else the teacher's
    label, the soft labels averaged over the query's answers (an ensemble's members)."""
    if method != "classifier-kd":
        return [TrainRow(query=it.query, answer=it.answer, label=it.label,
                         token_logprobs=it.token_logprobs if method == TrainingMethod.LOGIT_KD else None)
                for it in items]
    by_query: dict[object, list[_Item]] = {}
    for it in items:
        by_query.setdefault(it.query_key, []).append(it)
    rows = []
    for group in by_query.values():
        first = group[0]
        probs: dict[str, float] = {}
        with_probs = [it.label_probs for it in group if isinstance(it.label_probs, dict) and it.label_probs]
        for lp in with_probs:
            for k, v in lp.items():
                probs[k] = probs.get(k, 0.0) + float(v) / len(with_probs)
        votes: dict[str, int] = {}
        for it in group:
            if isinstance(it.label, str) and it.label in labels:
                votes[it.label] = votes.get(it.label, 0) + 1
        teacher_label = max(probs, key=probs.get) if probs else (max(votes, key=votes.get) if votes else None)
        gold = first.reference if first.reference in labels else None
        rows.append(TrainRow(query=first.query, answer=gold or teacher_label or "", label=gold or teacher_label,
                             teacher_label=teacher_label, label_probs=probs or None))
    return rows


def training_rows(*, run: TrainingRun) -> tuple[list[TrainRow], list[TrainRow], str]:
    """(train rows, validation rows, validation source: ``validation-split`` or ``holdout``).
    The train rows are the run's frozen dataset version (the curated dataset as it was when the
    run started, whatever was reviewed since); a run without one (made before versions existed)
    reads the curated dataset as it is now. Raises InvalidState when the version's file is
    missing or changed. A run on the golden references (``hyperparams["rows_source"] ==
    "golden"``, a teacher being domain-tuned) takes one row per golden query with a reference
    (answer = the reference) and validates on every 10th of them (``holdout``)."""
    project = run.project
    labels = list(project.labels or [])
    if (run.hyperparams or {}).get("rows_source") == "golden":
        rows = [TrainRow(query=text, answer=ref, label=ref if ref in labels else None)
                for text, ref in selectors.golden_reference_queries(project).values_list("text", "reference")]
        train, val = split_validation(rows)
        return train, val, "holdout"
    if run.dataset_version_id is not None:
        train = _rows_from_items(_items_from_version(run.dataset_version), run.method, labels)
    else:
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
    from workers.pipeline.sweeps import prune_reason
    from workers.pipeline.training import TrainingStopped, train

    run = TrainingRun.objects.select_related("project", "sweep").get(pk=job.payload["run_id"])
    resume = job.payload.get("resume_from_checkpoint")
    TrainingRun.objects.filter(pk=run.pk).update(status=JobStatus.RUNNING)
    # Checked again here, right before loading: a row that somehow holds a free path or another
    # project's artifact is refused (the run fails with the reason), never loaded.
    try:
        student, policy = model_ref_resolve(project=run.project, ref=run.student_model, field="student_model",
                                            kinds=_student_kinds(run.method))
        teacher_model = None
        hp = run.hyperparams or {}
        wants_teacher = (run.method == TrainingMethod.LOGIT_KD and hp.get("teacher") != TEACHER_FROM_SAMPLES) or (
            run.method == TrainingMethod.CLASSIFIER_KD and float(hp.get("feature_weight", 0)) > 0)
        if wants_teacher:
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
                     cache_dir=str(settings.MODEL_CACHE_DIR), policy=policy,
                     prompt_style="teacher" if run.hyperparams.get("rows_source") == "golden" else "student")

    # A sweep's trial stops early (pruned) once its validation divergence from the teacher has
    # grown for the sweep's ``divergence_patience`` evaluations in a row (see
    # workers.pipeline.sweeps.prune_reason); the evaluations logged before a resume count too.
    patience = run.sweep.divergence_patience if run.sweep is not None else 0
    evals = {m.step: (m.loss, m.fidelity) for m in TrainingMetric.objects.filter(run=run, split="validation")}
    pruned = {"reason": ""}

    def report(event: str, data: dict) -> None:
        if event == "metric":
            TrainingMetric.objects.update_or_create(
                run=run, step=int(data["step"]), split=data["split"],
                defaults={k: data.get(k) for k in ("epoch", "loss", "learning_rate", "grad_norm", "fidelity")})
            if patience and data["split"] == "validation":
                evals[int(data["step"])] = (data.get("loss"), data.get("fidelity"))
                pruned["reason"] = prune_reason([evals[k] for k in sorted(evals)], patience)
            reporter.report()
        elif event == "preflight":
            pf = {**data, "validation_source": val_source, "train_rows": len(train_rows),
                  "resume_from_checkpoint": resume}
            TrainingRun.objects.filter(pk=run.pk).update(preflight=pf)
            reporter.report(message="preflight passed" if data.get("ok") else "preflight refused", force=True)
        elif event == "progress":
            reporter.report(data.get("progress"), data.get("message"))

    def check_stop() -> None:
        reporter.check_cancel()
        if pruned["reason"]:
            raise TrainingStopped(pruned["reason"])

    try:
        result = train(spec, report=report, check_stop=check_stop)
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
    run.refresh_from_db()
    tuned = teacher_tune_register(run=run)  # a teacher-tuning run: its merged model becomes a teacher
    TrainingRun.objects.filter(pk=run.pk).update(
        train_loss=result.train_loss, best_val_loss=result.best_val_loss, best_step=result.best_step,
        stop_reason=result.stop_reason, preflight={**result.preflight, "validation_source": val_source,
                                                   "train_rows": len(train_rows), "resume_from_checkpoint": resume})
    return {"run": run.pk, "train_loss": result.train_loss, "best_val_loss": result.best_val_loss,
            "best_step": result.best_step, "global_step": result.global_step, "stop_reason": result.stop_reason,
            "resumed_from_step": result.resumed_from_step, "artifacts": artifacts,
            **({"tuned_teacher": tuned.name, "tuned_teacher_model": tuned.model} if tuned is not None else {}),
            "message": (f"Trained {result.global_step} steps; train loss {result.train_loss:.4f}"
                        if result.train_loss is not None else f"Trained {result.global_step} steps")
            + (f"; teacher {tuned.name} added ({tuned.model})" if tuned is not None else "")}
