"""Training runs, request side: start one from the curated dataset, cancel it, resume it from its
last checkpoint. The gpu-queue task's body (rows, training, artifacts) is ``workers.runs.training``.

Validation rows: curated samples (accepted, on train-split queries) are the training rows.
Validation loss and fidelity use samples of the project's *validation*-split queries that the
checks (or a human) accepted, when there are any; otherwise a deterministic hold-out of the train
rows (every 10th row in curated order, ``workers.pipeline.training.split_validation``) is used
and the run's preflight says ``"validation_source": "holdout"``.
"""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from projects import selectors
from projects.models import JOB_ENDED, Job, JobStatus, Project, Teacher, TrainingMethod, TrainingRun
from projects.services import InvalidInput, InvalidState
from projects.services.datasets import dataset_version_freeze
from projects.services.idempotency import idempotency_key_parse, start_find_earlier
from projects.services.jobs import job_cancel, job_create, job_enqueue
from projects.services.permissions import ensure_can_write
from projects.services.security import ARTIFACT_PREFIX, model_ref_check
from workers.pipeline import prompts
from workers.pipeline.training import (DEFAULT_STUDENT, METHODS, PRESETS, TEACHER_FROM_SAMPLES, TrainingRefused,
                                       apply_student_size, resolve_hyperparams)

JOB_KIND = "training"


def run_output_dir(*, run: TrainingRun) -> Path:
    """``MEDIA_ROOT/artifacts/<project-slug>/run-<id>``: artifacts, served by the default storage."""
    return Path(settings.MEDIA_ROOT) / "artifacts" / run.project.slug / f"run-{run.pk}"


def run_checkpoint_dir(*, run: TrainingRun) -> Path:
    """``DATA_DIR/checkpoints/<project-slug>/run-<id>``: Trainer checkpoints (not served)."""
    return Path(settings.DATA_DIR) / "checkpoints" / run.project.slug / f"run-{run.pk}"


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
                           "distributions the student learns; with an API teacher use sft-lora, or logit-kd "
                           f"with uld_weight > 0 and teacher={TEACHER_FROM_SAMPLES} to learn from its stored "
                           "top_logprobs")
    return t


def _logit_kd_teacher(project: Project, hp: dict) -> str:
    """The ``teacher`` a logit-kd run records: a local teacher's name, or ``samples`` (cross-
    tokenizer KD, ``uld_weight`` > 0, from the curated samples' stored top_logprobs) when asked
    for or when the project has no local teacher. Raises InvalidInput when neither exists."""
    name = hp.get("teacher", "")
    cross = float(hp.get("uld_weight", 0)) > 0
    if name == TEACHER_FROM_SAMPLES and not cross:
        raise InvalidInput(f"teacher={TEACHER_FROM_SAMPLES} (the samples' top_logprobs) needs uld_weight > 0: "
                           "their tokens are the API teacher's, not the student's")
    has_local = Teacher.objects.filter(project=project, provider=Teacher.Provider.TRANSFORMERS).exists()
    if cross and (name == TEACHER_FROM_SAMPLES or (not name and not has_local)):
        if not selectors.curated_samples(project).filter(token_logprobs__isnull=False).exists():
            raise InvalidInput("logit-kd with uld_weight > 0 and no local teacher learns from the samples' stored "
                               "top_logprobs, but no curated sample has them: generate with an API teacher that "
                               "returns logprobs, or add a local (transformers) teacher")
        return TEACHER_FROM_SAMPLES
    return _local_teacher(project, name).name


def _feature_teacher(project: Project, name: str) -> str:
    """The local teacher whose hidden states a classifier-kd run with ``feature_weight`` > 0
    matches: ``name``, else the project's first local teacher. Raises InvalidInput, naming
    feature_weight, when the project has none (or ``name`` is not one)."""
    if not Teacher.objects.filter(project=project, provider=Teacher.Provider.TRANSFORMERS).exists():
        raise InvalidInput("feature_weight > 0 (classifier-kd) matches a local (transformers) teacher's hidden "
                           "states, and this project has none: add one (e.g. smollm2-135m-instruct) or set "
                           "feature_weight to 0; relation_weight works with an API teacher (it compares the soft "
                           "labels)")
    return _local_teacher(project, name).name


def _student_kinds(method: str) -> tuple[str, ...]:
    return ("classifier",) if method == TrainingMethod.CLASSIFIER_KD else ("merged",)


#: Where a run's training rows come from: the curated dataset (teacher samples), or the golden
#: queries' reference answers (domain-tuning a local teacher, ``teacher_tune_start``).
ROWS_SOURCES = ("curated", "golden")
#: Methods that can domain-tune a local teacher (causal LM in, merged causal LM out).
TEACHER_TUNE_METHODS = (TrainingMethod.SFT_LORA.value, TrainingMethod.SFT_FULL.value)


def _sized_student(project: Project, size: str, student_model: str, teacher_name: str) -> str:
    """The student model reference of a student-size run: the local teacher's model (the
    student is that model cut to fewer layers). Refuses (InvalidInput) a project without a
    local teacher and a student that is not the teacher's model."""
    teachers = Teacher.objects.filter(project=project, provider=Teacher.Provider.TRANSFORMERS)
    if not teachers.exists():
        raise InvalidInput(f"student_size: {size!r} builds the student from a local (transformers) teacher's "
                           "layers, and this project has none; add one (e.g. smollm2-135m-instruct) or leave "
                           "student_size blank")
    teacher = _local_teacher(project, teacher_name)
    if student_model and student_model != teacher.model:
        raise InvalidInput(f"student_model: leave it blank with student_size: the {size} student is built from "
                           f"the local teacher {teacher.name!r} ({teacher.model}), not from {student_model!r}")
    return teacher.model


def training_start(*, project: Project, method: str, student_model: str = "", user=None, preset: str = "fast",
                   overrides: dict | None = None, idempotency_key=None, rows_source: str = "curated",
                   teacher_tune: dict | None = None, student_size: str = "") -> TrainingRun:
    """Create a TrainingRun and its Job, and queue ``training_run_task`` on the ``gpu`` queue
    after commit. ``overrides``: hyperparameters that replace the preset's (see
    ``workers.pipeline.training.PRESETS``). The curated dataset's sha256 and row count, every
    hyperparameter used and both prompt templates are stored on the run, and the curated
    dataset is frozen as a DatasetVersion (``datasets.dataset_version_freeze``: an existing
    version with the same bytes is reused) that the run links to.

    ``student_model``: a bundled name, a Hugging Face id ``org/name``, ``artifact:<id>`` (a
    ``merged`` artifact of THIS project for the causal methods, a ``classifier`` one for
    classifier-kd) or a folder under ``DISTILLHUB_MODEL_DIRS``; blank: the method's default.

    Double submits (see ``projects.services.idempotency``): the run created with
    ``idempotency_key`` (a UUID from the Train form) is returned when there is one, else a run
    with the same method, student, preset, hyperparameters and curated dataset whose job is
    still queued or running; the returned run's ``reused`` says which happened.

    ``rows_source="golden"`` (sft-lora / sft-full only) trains on the golden queries' reference
    answers instead of the curated dataset, with the teacher's prompt; ``teacher_tune`` (``{"teacher":
    id, "name": new teacher name}``, set by ``teacher_tune_start``) registers the result as a new
    local teacher when the run succeeds. Both are recorded in ``run.hyperparams``.

    Raises NotAllowed (viewer), InvalidInput (unknown method/preset/setting, a refused student
    model, classifier-kd on a non-classification project, logit-kd (or classifier-kd with
    ``feature_weight`` > 0) without a local teacher,
    golden rows with a method other than sft-lora/sft-full, a ``student_size`` for another
    method or without a local teacher), InvalidState (no curated rows; no golden references).

    ``student_size`` (light, medium, heavy; sft-full and logit-kd only; blank: none): the student
    is the project's local teacher (the logit-kd ``teacher`` setting, else the first) cut to about
    10 / 25 / 50 % of its layers (``workers.pipeline.student_init``), then fully fine-tuned. The
    run's ``student_model`` is the teacher's model and ``hyperparams["student_size"]`` the preset;
    ``TrainingRun.student_name`` reads e.g. ``smollm2-135m-instruct@light (3/30 layers)``.
    """
    ensure_can_write(user=user, team=project.team)
    if method not in METHODS:
        raise InvalidInput(f"method: {method!r} is not one of {', '.join(METHODS)}")
    try:
        hp = resolve_hyperparams(method, preset, overrides)
        hp = apply_student_size(hp, method=method, preset=preset, size=student_size, overrides=overrides)
    except TrainingRefused as exc:
        raise InvalidInput(str(exc)) from None
    student_model = (student_model or "").strip()
    if hp.get("student_size"):
        student_model = _sized_student(project, hp["student_size"], student_model, hp.get("teacher", ""))
    student_model = student_model or DEFAULT_STUDENT[method]
    if len(student_model) > 300:
        raise InvalidInput(f"student_model: at most 300 characters, got {len(student_model)}")
    student_model = model_ref_check(project=project, ref=student_model, field="student_model",
                                    kinds=_student_kinds(method))
    if method == TrainingMethod.CLASSIFIER_KD and (project.task_type != "classification" or len(project.labels) < 2):
        raise InvalidInput("method: classifier-kd needs a classification project with at least two labels; "
                           "use sft-lora for this task")
    if method == TrainingMethod.LOGIT_KD:
        hp["teacher"] = _logit_kd_teacher(project, hp)
    if method == TrainingMethod.CLASSIFIER_KD and float(hp.get("feature_weight", 0)) > 0:
        hp["teacher"] = _feature_teacher(project, hp.get("teacher", ""))
    if rows_source not in ROWS_SOURCES:
        raise InvalidInput(f"rows_source: {rows_source!r} is not one of {', '.join(ROWS_SOURCES)}")
    if rows_source == "golden":
        if method not in TEACHER_TUNE_METHODS:
            raise InvalidInput(f"method: training on the golden references takes {' or '.join(TEACHER_TUNE_METHODS)}, "
                               f"not {method}")
        sha, n = selectors.golden_references_sha256(project)
        if n == 0:
            raise InvalidState(f"project {project.slug} has no golden query with a reference answer: import a golden "
                               "set with references first (`distill import --golden --reference-column C`)")
        hp["rows_source"] = "golden"
        if teacher_tune:
            hp["teacher_tune"] = {"teacher": int(teacher_tune["teacher"]), "name": str(teacher_tune["name"])}
    else:
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
        # A run on the golden references trains on them, not on the curated dataset: no version.
        version = dataset_version_freeze(project=project, user=user) if rows_source != "golden" else None
        job = job_create(kind=JOB_KIND, team=project.team, project=project, user=user)
        run = TrainingRun.objects.create(
            project=project, job=job, method=method, student_model=student_model, preset=preset,
            hyperparams=hp, dataset_sha256=sha, dataset_rows=n, dataset_version=version,
            student_prompt_template=(prompts.teacher_template(spec) if rows_source == "golden"
                                     else prompts.student_template(spec) if method != "classifier-kd" else "{query}"),
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


def teacher_tune_start(*, project: Project, teacher, user=None, method: str = "sft-lora", preset: str = "fast",
                       overrides: dict | None = None, name: str = "", idempotency_key=None) -> TrainingRun:
    """Domain-tune a local teacher before it labels data: train ``teacher`` (a Teacher of
    ``project`` or its name; provider ``transformers``) with the usual training code
    (``training_start``, ``method`` sft-lora or sft-full, ``preset`` and ``overrides`` as there)
    on the golden queries' reference answers, rendered with the teacher's prompt. When the run
    succeeds the worker registers a new local teacher ``name`` (default ``<teacher>-tuned``)
    whose model is ``artifact:<id>`` of the run's merged model, with the original's temperature,
    max tokens and timeout (``teacher_tune_register``). Returns the TrainingRun (its job on the
    ``gpu`` queue).

    Raises NotAllowed (viewer); InvalidInput when the teacher is not a teacher of the project or
    not local (an API teacher's weights cannot be trained here), the method is not sft-lora /
    sft-full, or ``name`` is taken or too long; InvalidState when the project has no golden query
    with a reference answer."""
    ensure_can_write(user=user, team=project.team)
    if not isinstance(teacher, Teacher):
        found = Teacher.objects.filter(project=project, name=str(teacher or "")).first()
        if found is None:
            raise InvalidInput(f"teacher: project {project.slug} has no teacher named {teacher!r}")
        teacher = found
    elif teacher.project_id != project.pk:
        raise InvalidInput(f"teacher: {teacher.name!r} is not a teacher of project {project.slug}")
    if teacher.provider != Teacher.Provider.TRANSFORMERS:
        raise InvalidInput(f"teacher: {teacher.name!r} is an {teacher.provider} teacher; only a local (transformers) "
                           "teacher can be tuned here (its weights must be on this machine)")
    if method not in TEACHER_TUNE_METHODS:
        raise InvalidInput(f"method: a teacher is tuned with {' or '.join(TEACHER_TUNE_METHODS)}, not {method!r}")
    name = (name or "").strip() or f"{teacher.name}-tuned"
    if len(name) > 100:
        raise InvalidInput(f"name: at most 100 characters, got {len(name)}")
    if Teacher.objects.filter(project=project, name=name).exists():
        raise InvalidInput(f"name: project {project.slug} already has a teacher named {name!r}; choose another name")
    if selectors.golden_references_sha256(project)[1] == 0:
        raise InvalidState(f"project {project.slug} has no golden query with a reference answer: import a golden "
                           "set with references first (`distill import --golden --reference-column C`)")
    return training_start(project=project, method=method, student_model=teacher.model, user=user, preset=preset,
                          overrides=overrides, idempotency_key=idempotency_key, rows_source="golden",
                          teacher_tune={"teacher": teacher.pk, "name": name})


def teacher_tune_register(*, run: TrainingRun) -> Teacher | None:
    """After a teacher-tuning run (``run.hyperparams["teacher_tune"]``) succeeded: add the tuned
    local teacher, ``model = "artifact:<id>"`` of the run's ``merged`` artifact, copying the
    original teacher's sampling settings; ``options`` records ``tuned_from`` (teacher id) and
    ``training_run``. Idempotent: a teacher this run registered already is returned as it is.
    When the name was taken meanwhile, ``<name>-run<id>`` is used. Returns None for other runs.
    Raises InvalidState when the run has no merged artifact."""
    from projects.models import ModelArtifact
    from projects.services.generation import teacher_create

    tune = (run.hyperparams or {}).get("teacher_tune")
    if not tune:
        return None
    done = Teacher.objects.filter(project=run.project, options__tuned_by_run=run.pk).first()
    if done is not None:
        return done
    art = ModelArtifact.objects.filter(training_run=run, kind="merged").first()
    if art is None:
        raise InvalidState(f"training run {run.pk} has no merged model to use as a teacher")
    source = Teacher.objects.filter(pk=tune["teacher"], project=run.project).first()
    name = tune["name"]
    if Teacher.objects.filter(project=run.project, name=name).exists():
        name = f"{name}-run{run.pk}"[:100]
    kw = {"temperature": source.temperature, "max_tokens": source.max_tokens, "top_logprobs": source.top_logprobs,
          "timeout_s": source.timeout_s} if source is not None else {}
    with transaction.atomic():
        t = teacher_create(project=run.project, name=name, provider=Teacher.Provider.TRANSFORMERS,
                           model=f"{ARTIFACT_PREFIX}{art.pk}", **kw)
        t.options = {**(t.options or {}), "tuned_from": tune["teacher"], "tuned_by_run": run.pk,
                     "rows_source": "golden"}
        t.save(update_fields=["options"])
    return t


def _enqueue(job: Job) -> None:

    job_enqueue(job=job, task="workers.tasks.training_run_task", queue="gpu")


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
    if run.sweep_id is not None:  # a sweep's trial: its sweep tells the study and asks the next
        from projects.services.sweeps import sweep_ended_trial_hook

        sweep_ended_trial_hook(run=run)


def presets_table() -> dict:
    """``{method: {preset: hyperparams}}`` for the Train form."""
    return PRESETS
