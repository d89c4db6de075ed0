"""The DistillHub domain: teams, projects and every stage of the distillation loop.

Money is stored as ``Decimal`` US dollars, tokens as integers, latencies in milliseconds,
sizes in bytes, progress as a fraction in [0, 1].
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex, OpClass
from django.db import models
from django.db.models.functions import Upper


class Team(models.Model):
    """A group of users that owns projects; every object a user sees belongs to one of their teams."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer (read only)"


class Membership(models.Model):
    """A user's role in a team. Viewers read; members and owners also write."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="membership_team_user_unique")]

    @property
    def can_write(self) -> bool:
        return self.role in (Role.OWNER, Role.MEMBER)


class TaskType(models.TextChoices):
    CLASSIFICATION = "classification", "Classification"
    EXTRACTION = "extraction", "Extraction (JSON)"
    SUMMARIZATION = "summarization", "Summarization"
    GENERATION = "generation", "Generation"


class Project(models.Model):
    """One narrow task to distil: its type, the teacher's instructions, labels or output schema.

    ``labels``: list of label strings (classification). ``output_schema``: a JSON Schema dict
    (extraction). ``few_shot``: list of ``{"query": str, "answer": str}``. ``checks``: settings of
    the quality checks, e.g. ``{"min_length": 1, "max_length": 4000, "refusal": true,
    "judge_teacher": null}``. Split fractions sum to 1.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="projects")
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    task_type = models.CharField(max_length=20, choices=TaskType.choices, default=TaskType.CLASSIFICATION)
    instructions = models.TextField(blank=True, default="")
    labels = models.JSONField(default=list, blank=True)
    output_schema = models.JSONField(null=True, blank=True)
    few_shot = models.JSONField(default=list, blank=True)
    checks = models.JSONField(default=dict, blank=True)
    split_train = models.FloatField(default=0.8)
    split_validation = models.FloatField(default=0.1)
    split_test = models.FloatField(default=0.1)
    # Review: the share of checks-accepted samples drawn (deterministically, by sample id) into
    # the audit queue, and the highest sample id already considered for it.
    review_audit_share = models.FloatField(default=0.05)
    review_audit_marked_upto = models.BigIntegerField(default=0)
    # Query search: every import bumps ``search_version``; the search indexer (a Celery task)
    # copies the new queries into QuerySearch and then records the version it caught up with.
    # While ``search_indexed_version < search_version`` the query list searches the queries
    # themselves (a scan, always complete) instead of the index.
    search_version = models.BigIntegerField(default=0)
    search_indexed_version = models.BigIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The New project form's idempotency key (a uuid4 per render): the same form posted twice
    # makes one project. Unique per team, so one team's keys never match another's.
    idempotency_key = models.UUIDField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["team", "idempotency_key"],
                                               name="project_team_idempotency_key_unique")]

    def __str__(self) -> str:
        return self.name


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


JOB_ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(models.Model):
    """A background job on Celery and the single source of its state for pages and the CLI.

    ``progress`` is a fraction in [0, 1]. ``payload`` holds the task's arguments (ids, options);
    ``result`` a JSON summary written when it ends. A task claims its row with a conditional
    UPDATE (queued -> running) so a redelivered message does nothing.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="jobs")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=40)
    status = models.CharField(max_length=10, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)
    message = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    payload = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    cancel_requested = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    celery_task_id = models.CharField(max_length=255, blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="job_status_heartbeat")]

    @property
    def ended(self) -> bool:
        return self.status in JOB_ENDED

    def __str__(self) -> str:
        return f"Job {self.pk} {self.kind} {self.status}"


# --- Ingest ---------------------------------------------------------------------------------


class Split(models.TextChoices):
    TRAIN = "train", "Train"
    VALIDATION = "validation", "Validation"
    TEST = "test", "Test (held out)"
    GOLDEN = "golden", "Golden set"


class Dataset(models.Model):
    """One uploaded file and its import report (``skipped``: list of ``{"line": int, "reason": str}``)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        IMPORTED = "imported", "Imported"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=255)
    file = models.FileField(upload_to="uploads/%Y/%m/", max_length=500, blank=True)
    golden = models.BooleanField(default=False)
    text_column = models.CharField(max_length=200, blank=True, default="")
    reference_column = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    encoding = models.CharField(max_length=50, blank=True, default="")
    sha256 = models.CharField(max_length=64, blank=True, default="")
    imported = models.IntegerField(default=0)
    duplicates = models.IntegerField(default=0)
    skipped = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True, default="")
    # The rest of the import report: ``format``, ``size_bytes``, ``rows_read``, ``splits``
    # ({train, validation, test} or {golden} counts of the queries this file added),
    # ``golden``, ``skipped_total``, ``warnings`` (list of {line, reason}), ``columns``.
    report = models.JSONField(default=dict, blank=True)
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="dataset")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)


class Query(models.Model):
    """One input to the task. ``text_hash`` is the sha256 of the normalised text (NFKC,
    case-folded, whitespace collapsed); it is unique per project and golden flag, and decides the
    split deterministically. ``reference`` is the gold answer or label when one was given."""

    # No single-column indexes on project and split: the composite indexes below lead with
    # project (and split), and every extra index slows bulk imports.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="queries", db_index=False)
    # No index on dataset either: nothing looks queries up by dataset but deleting one, and each
    # index costs every import (about 0.2 s per 100,000 rows here).
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="queries",
                                db_index=False)
    text = models.TextField()
    text_hash = models.CharField(max_length=64)
    split = models.CharField(max_length=10, choices=Split.choices)
    golden = models.BooleanField(default=False)
    reference = models.TextField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    line = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "golden", "text_hash"], name="query_project_golden_hash_unique"),
        ]
        indexes = [
            models.Index(fields=["project", "split", "id"], name="query_project_split_id"),
            # The query list pages through all splits by id (keyset pagination).
            models.Index(fields=["project", "id"], name="query_project_id"),
        ]


class QuerySearch(models.Model):
    """The substring-search index of the queries: a copy of each query's text under a pg_trgm GIN
    index on UPPER(text), filled after an import commits (``projects.services.ingest.
    query_search_index``) so that the import itself does not maintain a trigram index (about
    5 s per 100,000 rows here). Deleting a query deletes its row here (a database-level ON DELETE
    CASCADE, added by migration 0004, so the ORM never loads these rows)."""

    query = models.OneToOneField(Query, primary_key=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                 related_name="+")
    project_id = models.BigIntegerField()
    text = models.TextField()

    class Meta:
        indexes = [
            # Substring search (ILIKE '%...%') over millions of queries.
            GinIndex(OpClass(Upper("text"), name="gin_trgm_ops"), name="querysearch_text_trgm"),
        ]


# --- Teachers and generation ----------------------------------------------------------------


class Teacher(models.Model):
    """A model that answers queries. ``provider``: ``openai`` (any OpenAI-compatible endpoint),
    ``transformers`` (a local model: bundled short name, HF id or folder) or ``ensemble`` (of
    ``members``). The API key is never stored: ``api_key_env`` names the environment variable.
    Prices are USD per 1M tokens."""

    class Provider(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible API"
        TRANSFORMERS = "transformers", "Local transformers model"
        ENSEMBLE = "ensemble", "Ensemble of teachers"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="teachers")
    name = models.CharField(max_length=100)
    provider = models.CharField(max_length=20, choices=Provider.choices)
    model = models.CharField(max_length=300, blank=True, default="")
    base_url = models.CharField(max_length=500, blank=True, default="")
    api_key_env = models.CharField(max_length=100, blank=True, default="")
    temperature = models.FloatField(default=0.3)
    max_tokens = models.IntegerField(default=256)
    top_logprobs = models.IntegerField(null=True, blank=True)
    timeout_s = models.FloatField(default=60.0)
    price_in_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    price_out_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    members = models.ManyToManyField("self", symmetrical=False, blank=True, related_name="ensembles")
    options = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="teacher_project_name_unique")]

    def __str__(self) -> str:
        return self.name


class RunBase(models.Model):
    """The columns every run (GenerationRun, TrainingRun, Evaluation) shares: its ``status``
    (mirroring its Job's), who started it and when, when it ended, and the start form's
    idempotency key (see projects.services.idempotency; unique per project, each run names its
    constraint). Abstract: no table of its own."""

    status = models.CharField(max_length=10, choices=JobStatus.choices, default=JobStatus.QUEUED)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.UUIDField(null=True, blank=True, editable=False)

    class Meta:
        abstract = True
        ordering = ["-created_at"]


class GenerationRun(RunBase):
    """One pass of the teacher(s) over the train queries, with rejection sampling by the checks.
    Counters are kept current while it runs; cost in USD."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="generation_runs")
    teachers = models.ManyToManyField(Teacher, related_name="runs")
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="generation_run")
    samples_per_query = models.IntegerField(default=1)
    concurrency = models.IntegerField(default=16)
    limit = models.IntegerField(null=True, blank=True)
    budget_usd = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    stop_reason = models.CharField(max_length=200, blank=True, default="")
    accepted = models.IntegerField(default=0)
    rejected = models.IntegerField(default=0)
    failed = models.IntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    options = models.JSONField(default=dict, blank=True)

    class Meta(RunBase.Meta):
        constraints = [models.UniqueConstraint(fields=["project", "idempotency_key"],
                                               name="generationrun_project_idempotency_key_unique")]


class SampleStatus(models.TextChoices):
    ACCEPTED = "accepted", "Accepted"
    REJECTED = "rejected", "Rejected"
    FAILED = "failed", "Failed (no answer)"


class Sample(models.Model):
    """One teacher answer to one query, with every check's result.

    ``prompt``: the exact chat messages sent. ``parsed``: the label string or the JSON object.
    ``label_probs``: ``{label: probability}`` (soft labels) where the teacher gives them.
    ``checks``: list of ``{"name": str, "passed": bool, "reason": str}``. ``status`` is what the
    checks decided; ``review_status`` is the human decision that overrides it (null: none yet).
    ``final_response`` is what training uses: the edit if one was made, else the response.
    """

    run = models.ForeignKey(GenerationRun, on_delete=models.CASCADE, related_name="samples")
    query = models.ForeignKey(Query, on_delete=models.CASCADE, related_name="samples")
    teacher = models.ForeignKey(Teacher, on_delete=models.CASCADE, related_name="samples")
    sample_index = models.IntegerField(default=0)
    prompt = models.JSONField(default=list, blank=True)
    response = models.TextField(null=True, blank=True)
    parsed = models.JSONField(null=True, blank=True)
    finish_reason = models.CharField(max_length=40, blank=True, default="")
    input_tokens = models.IntegerField(default=0)
    output_tokens = models.IntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    latency_ms = models.FloatField(null=True, blank=True)
    label_probs = models.JSONField(null=True, blank=True)
    token_logprobs = models.JSONField(null=True, blank=True)
    checks = models.JSONField(default=list, blank=True)
    failed_checks = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=10, choices=SampleStatus.choices, db_index=True)
    error = models.TextField(blank=True, default="")
    # Human review
    review_status = models.CharField(max_length=10, null=True, blank=True, choices=[("accepted", "Accepted"), ("rejected", "Rejected")])
    edited_response = models.TextField(null=True, blank=True)
    reviewed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    reviewed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    claimed_until = models.DateTimeField(null=True, blank=True)
    audit = models.BooleanField(default=False)
    version = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "query", "teacher", "sample_index"], name="sample_slot_unique"),
        ]
        indexes = [
            models.Index(fields=["run", "status", "review_status", "id"], name="sample_queue"),
            # The review queues scan these in id order (partial: only items still to review).
            models.Index(fields=["id"], name="sample_review_todo",
                         condition=models.Q(status="rejected", review_status__isnull=True)),
            models.Index(fields=["id"], name="sample_audit_todo",
                         condition=models.Q(status="accepted", audit=True, review_status__isnull=True)),
        ]

    @property
    def final_response(self) -> str | None:
        return self.edited_response if self.edited_response is not None else self.response

    @property
    def curated(self) -> bool:
        """True when the sample belongs in the training set (accepted by checks or by a human)."""
        if self.review_status:
            return self.review_status == "accepted"
        return self.status == SampleStatus.ACCEPTED


class ReviewDecision(models.Model):
    """History of human decisions on a sample: who, what, when; the original answer kept."""

    sample = models.ForeignKey(Sample, on_delete=models.CASCADE, related_name="decisions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    decision = models.CharField(max_length=20)
    previous_review_status = models.CharField(max_length=10, null=True, blank=True)
    previous_edited_response = models.TextField(null=True, blank=True)
    original_response = models.TextField(null=True, blank=True)
    edited_response = models.TextField(null=True, blank=True)
    undone = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # For undo: the parsed value before the decision, the sample's version after it, and the
    # bulk action it belongs to (one undo reverts the whole bulk action).
    previous_parsed = models.JSONField(null=True, blank=True)
    version_after = models.IntegerField(null=True, blank=True)
    batch = models.UUIDField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "undone", "-id"], name="decision_user_latest")]


# --- Training -------------------------------------------------------------------------------


class TrainingMethod(models.TextChoices):
    SFT_LORA = "sft-lora", "SFT with LoRA"
    SFT_FULL = "sft-full", "Full SFT"
    CLASSIFIER_KD = "classifier-kd", "Classifier with soft-label KD"
    LOGIT_KD = "logit-kd", "Token-level logit KD"


class DatasetVersion(models.Model):
    """A frozen snapshot of a project's curated dataset, written when a training run starts
    (``projects.services.datasets.dataset_version_freeze``): the exported file (``format``, e.g.
    ``hf-jsonl``) at ``path`` (relative to MEDIA_ROOT), its ``sha256`` (of the file's bytes,
    unique per project: the same data is one version), ``rows`` and ``size_bytes``. ``number``
    counts a project's versions from 1."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="dataset_versions")
    number = models.IntegerField()
    sha256 = models.CharField(max_length=64)
    rows = models.IntegerField()
    size_bytes = models.BigIntegerField(default=0)
    format = models.CharField(max_length=20)
    path = models.CharField(max_length=500)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]
        constraints = [models.UniqueConstraint(fields=["project", "sha256"], name="datasetversion_project_sha256_unique"),
                       models.UniqueConstraint(fields=["project", "number"], name="datasetversion_project_number_unique")]

    def __str__(self) -> str:
        return f"v{self.number}"


class SweepSearch(models.TextChoices):
    GRID = "grid", "Grid"
    RANDOM = "random", "Random"
    TPE = "tpe", "Bayesian (TPE)"


class Sweep(RunBase):
    """A hyperparameter sweep: ``n_trials`` training runs of one method, student and preset, each
    with hyperparameters an Optuna study asks for (``search``: grid, random or TPE), minimising
    the trial's best validation loss. ``space``: ``{name: {"values": [...]}`` or ``{"low", "high",
    "log"}}`` (see ``workers.pipeline.sweeps``); ``fixed``: overrides every trial shares (e.g.
    ``max_steps``). The trials are TrainingRuns with ``sweep`` set; the study (``study_name``)
    lives in the same PostgreSQL through Optuna's RDBStorage. ``divergence_patience``: a trial
    whose validation student-teacher divergence grows for that many consecutive evaluations is
    stopped and pruned (0: off). ``status`` is the sweep's own (it has no Job: each trial has)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="sweeps")
    method = models.CharField(max_length=20, choices=TrainingMethod.choices)
    student_model = models.CharField(max_length=300)
    preset = models.CharField(max_length=40, default="fast")
    search = models.CharField(max_length=10, choices=SweepSearch.choices)
    space = models.JSONField(default=dict)
    fixed = models.JSONField(default=dict, blank=True)
    n_trials = models.IntegerField()
    objective = models.CharField(max_length=40, default="best_val_loss")
    divergence_patience = models.IntegerField(default=2)
    seed = models.IntegerField(default=0)
    study_name = models.CharField(max_length=200, unique=True)
    stop_reason = models.CharField(max_length=300, blank=True, default="")

    class Meta(RunBase.Meta):
        pass


class TrainingRun(RunBase):
    """A student trained from the curated dataset. ``hyperparams`` holds every setting used
    (LoRA rank, alpha, target modules, learning rate, epochs, temperature, KD alpha, ...).
    ``dataset_sha256`` is the content hash of the curated dataset it was trained on;
    ``dataset_version`` the frozen file of that dataset (see DatasetVersion)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="training_run")
    method = models.CharField(max_length=20, choices=TrainingMethod.choices)
    student_model = models.CharField(max_length=300)
    preset = models.CharField(max_length=40, blank=True, default="")
    hyperparams = models.JSONField(default=dict, blank=True)
    stop_reason = models.CharField(max_length=300, blank=True, default="")
    dataset_sha256 = models.CharField(max_length=64, blank=True, default="")
    dataset_rows = models.IntegerField(default=0)
    dataset_version = models.ForeignKey(DatasetVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="training_runs")
    student_prompt_template = models.TextField(blank=True, default="")
    teacher_prompt_template = models.TextField(blank=True, default="")
    preflight = models.JSONField(default=dict, blank=True)
    train_loss = models.FloatField(null=True, blank=True)
    best_val_loss = models.FloatField(null=True, blank=True)
    best_step = models.IntegerField(null=True, blank=True)
    output_dir = models.CharField(max_length=500, blank=True, default="")
    # A sweep's trial: its sweep and its Optuna trial number (unique within the sweep).
    sweep = models.ForeignKey(Sweep, null=True, blank=True, on_delete=models.SET_NULL, related_name="trials")
    sweep_trial = models.IntegerField(null=True, blank=True)

    class Meta(RunBase.Meta):
        constraints = [models.UniqueConstraint(fields=["sweep", "sweep_trial"], name="trainingrun_sweep_trial_unique"),
                       models.UniqueConstraint(fields=["project", "idempotency_key"],
                                               name="trainingrun_project_idempotency_key_unique")]

    @property
    def student_size(self) -> str:
        """The student-size preset (light / medium / heavy), blank for a full-size student."""
        return (self.hyperparams or {}).get("student_size") or ""

    @property
    def student_name(self) -> str:
        """The student as people read it: ``student_model``, or for a student-size run e.g.
        ``smollm2-135m-instruct@light (3/30 layers)`` (layer counts once the worker built it)."""
        size = self.student_size
        if not size:
            return self.student_model
        pf = self.preflight or {}
        if pf.get("student_layers") and pf.get("teacher_layers"):
            return f"{self.student_model}@{size} ({pf['student_layers']}/{pf['teacher_layers']} layers)"
        return f"{self.student_model}@{size}"


class TrainingMetric(models.Model):
    """One logged point of a training curve; ``split`` is ``train`` or ``validation``."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metrics")
    step = models.IntegerField()
    epoch = models.FloatField(null=True, blank=True)
    split = models.CharField(max_length=12, default="train")
    loss = models.FloatField(null=True, blank=True)
    learning_rate = models.FloatField(null=True, blank=True)
    grad_norm = models.FloatField(null=True, blank=True)
    fidelity = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["step"]
        constraints = [models.UniqueConstraint(fields=["run", "step", "split"], name="trainingmetric_run_step_split_unique")]


class ModelArtifact(models.Model):
    """A file or folder a training run produced: ``adapter``, ``merged``, ``tokenizer``, ``int8``,
    ``classifier``. ``path`` is relative to the data dir's storage; size in bytes."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="artifacts")
    training_run = models.ForeignKey(TrainingRun, null=True, blank=True, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=20)
    path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["training_run", "kind"], name="artifact_run_kind_unique")]


# --- Evaluation -----------------------------------------------------------------------------


class Evaluation(RunBase):
    """Student(s) vs teacher(s) on the test split or the golden set. ``charts``: plotly figure
    dicts by name; ``summary``: headline figures; ``verdict``: e.g. "ready to ship"."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="evaluations")
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluation")
    split = models.CharField(max_length=10, default=Split.TEST)
    verdict = models.CharField(max_length=300, blank=True, default="")
    ready_to_ship = models.BooleanField(null=True, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    charts = models.JSONField(default=dict, blank=True)
    options = models.JSONField(default=dict, blank=True)

    class Meta(RunBase.Meta):
        constraints = [models.UniqueConstraint(fields=["project", "idempotency_key"],
                                               name="evaluation_project_idempotency_key_unique")]


class EvalResult(models.Model):
    """One model's figures in an evaluation. ``role``: ``teacher``, ``student`` or ``base``.
    ``quality`` is the task's headline metric (accuracy, field F1, ROUGE-L); ``quality_retention``
    = student quality / teacher quality. Latencies in ms, throughput in queries/s, cost in USD per
    1,000 queries."""

    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="results")
    model_name = models.CharField(max_length=300)
    role = models.CharField(max_length=10)
    teacher = models.ForeignKey(Teacher, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    artifact = models.ForeignKey(ModelArtifact, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    metrics = models.JSONField(default=dict, blank=True)
    quality = models.FloatField(null=True, blank=True)
    quality_retention = models.FloatField(null=True, blank=True)
    latency_ms_p50 = models.FloatField(null=True, blank=True)
    latency_ms_p95 = models.FloatField(null=True, blank=True)
    throughput_qps = models.FloatField(null=True, blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True)
    cost_per_1k_usd = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)


class EvalPrediction(models.Model):
    """One model's answer to one evaluation query, for the side-by-side view."""

    result = models.ForeignKey(EvalResult, on_delete=models.CASCADE, related_name="predictions")
    query = models.ForeignKey(Query, on_delete=models.CASCADE, related_name="+")
    output = models.TextField(blank=True, default="")
    label = models.CharField(max_length=300, null=True, blank=True)
    probs = models.JSONField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    correct = models.BooleanField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["result", "query"], name="evalprediction_result_query_unique")]


# --- Serving: deployments, gateway keys, request logs -----------------------------------------


class Deployment(models.Model):
    """A project's student served behind the gateway (``gateway/``) with A/B routing against a
    teacher. Clients address it by ``slug`` as the OpenAI ``model`` field (unique per team; set
    ``team`` is the project's, filled in on save).

    The student is either ``student_artifact`` (a classifier folder the gateway loads in-process,
    or any artifact served by ``distill serve-student`` at ``student_url``) or an external
    OpenAI-compatible endpoint at ``student_url`` (vLLM, llama.cpp server, Ollama) serving
    ``student_model``. ``student_share`` and ``shadow_share`` are fractions in [0, 1].
    ``confidence_threshold``: a classifier's top-label probability (0-1) or a causal LM's mean
    token log-probability (<= 0); a student answer under it is answered by the teacher
    (fallback); None disables it. ``teacher_url``: where a local (transformers) teacher is served.
    ``promote_delta``: the largest live quality delta (1 - agreement) allowed for promotion, over
    the last ``promote_window`` shadow comparisons; ``alert_agreement``: the divergence alert
    fires when agreement over the last ``alert_window`` comparisons falls below it.
    ``retrain_every``: continuous distillation trains a new student once this many new
    production samples were harvested (0: off). Every change writes a DeploymentVersion."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="deployments")
    # The project's team, kept here so a slug is unique per team (a database constraint): the
    # gateway looks a slug up among the requesting key's team's deployments only, so another
    # team's names never collide with (or reveal themselves through) yours.
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=120)
    teacher = models.ForeignKey(Teacher, on_delete=models.CASCADE, related_name="deployments")
    teacher_url = models.CharField(max_length=500, blank=True, default="")
    student_artifact = models.ForeignKey(ModelArtifact, null=True, blank=True, on_delete=models.SET_NULL, related_name="deployments")
    student_url = models.CharField(max_length=500, blank=True, default="")
    student_model = models.CharField(max_length=300, blank=True, default="")
    student_price_in_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    student_price_out_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    student_share = models.FloatField(default=0.05)
    confidence_threshold = models.FloatField(null=True, blank=True)
    shadow_share = models.FloatField(default=0.0)
    active = models.BooleanField(default=True)
    version = models.IntegerField(default=1)
    promote_delta = models.FloatField(default=0.05)
    promote_window = models.IntegerField(default=200)
    auto_promote = models.BooleanField(default=False)
    alert_agreement = models.FloatField(default=0.9)
    alert_window = models.IntegerField(default=100)
    retrain_every = models.IntegerField(default=0)
    harvested_upto = models.BigIntegerField(default=0)
    harvested_since_retrain = models.IntegerField(default=0)
    retrain_run = models.ForeignKey(TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    candidate_artifact = models.ForeignKey(ModelArtifact, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=("team", "slug"), name="deployment_slug_per_team")]

    def save(self, *args, **kwargs):
        if self.team_id is None and self.project_id is not None:
            self.team_id = self.project.team_id
        super().save(*args, **kwargs)

    def __str__(self) -> str:
        return self.slug


class DeploymentVersion(models.Model):
    """The audit trail of a deployment: its routing settings (``config``) after each change,
    the ``action`` (create, update, promote, rollback, candidate), who and when."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="versions")
    version = models.IntegerField()
    action = models.CharField(max_length=20)
    config = models.JSONField(default=dict)
    note = models.CharField(max_length=300, blank=True, default="")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]
        constraints = [models.UniqueConstraint(fields=["deployment", "version"], name="deploymentversion_unique")]


class GatewayKey(models.Model):
    """A team's API key for the gateway. Only the sha256 of the key is stored (``key_hash``,
    hex); ``prefix`` (its first characters) identifies it on pages. Revoked keys stop working
    within the gateway's refresh interval."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="gateway_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]


class RequestLog(models.Model):
    """One gateway request (or one shadow comparison), written in batches by the gateway.

    ``route``: ``student``, ``teacher``, ``fallback`` (student under the confidence threshold or
    failing; the teacher answered) or ``shadow`` (the teacher's answer to a student-answered
    request, compared: ``agreed``). Latency in ms (``latency_ms``: the whole request at the
    gateway; ``upstream_ms``: the answering upstream's), cost in USD, ``confidence`` as in
    Deployment. ``query``: the last user message; ``response``: the answer returned (or the
    teacher's, for shadow rows); ``teacher_response`` is set whenever the teacher answered."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="requests", db_index=False)
    key = models.ForeignKey(GatewayKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False)
    version = models.IntegerField(default=1)
    route = models.CharField(max_length=10)
    status = models.IntegerField(default=200)
    stream = models.BooleanField(default=False)
    latency_ms = models.FloatField(null=True, blank=True)
    upstream_ms = models.FloatField(null=True, blank=True)
    input_tokens = models.IntegerField(default=0)
    output_tokens = models.IntegerField(default=0)
    confidence = models.FloatField(null=True, blank=True)
    cost_usd = models.FloatField(default=0.0)
    agreed = models.BooleanField(null=True, blank=True)
    query = models.TextField(blank=True, default="")
    response = models.TextField(null=True, blank=True)
    teacher_response = models.TextField(null=True, blank=True)
    finish_reason = models.CharField(max_length=40, blank=True, default="")
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [models.Index(fields=["deployment", "route", "id"], name="requestlog_dep_route_id"),
                   models.Index(fields=["deployment", "created_at"], name="requestlog_dep_created")]
