"""Django forms: they parse and validate input; services do the writes."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

from django import forms

from projects.models import TaskType, Teacher, TrainingMethod
from projects.services import ServiceError
from projects.services import security
from projects.services.projects import MAX_ANSWER_CHARS
from workers.pipeline.student_init import STUDENT_SIZE_DESCRIPTIONS
from workers.pipeline.training import PRESET_DESCRIPTIONS, SIZE_METHODS


def key_value_lines(text: str) -> dict[str, str]:
    """``key=value`` lines (blank lines skipped) as a dict of stripped texts; the values are
    checked by the caller. Raises ValidationError naming the first line without ``=``."""
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise forms.ValidationError(f"line {i}: write key=value")
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _artifact_choices(field, project, kinds) -> None:
    """Limit an artifact select to ``project``'s model artifacts of ``kinds`` (another
    project's id is an invalid choice)."""
    from projects.models import ModelArtifact

    field.queryset = (ModelArtifact.objects.filter(project=project, kind__in=kinds).order_by("-id")
                      if project is not None else ModelArtifact.objects.none())
    field.label_from_instance = lambda a: f"artifact:{a.pk} ({a.kind} of training run {a.training_run_id})"


def _checked(check, value: str) -> str:
    """``value`` when ``check(value)`` passes; its ServiceError as the field's error."""
    try:
        check(value)
    except ServiceError as exc:
        raise forms.ValidationError(str(exc)) from None
    return value


def idempotency_key_field() -> forms.UUIDField:
    """A hidden field holding a fresh uuid4 each time the form is rendered: posted twice (a
    double click), the form's service returns what the first POST made (see
    ``projects.services.idempotency``). Templates render it with the form's hidden fields."""
    return forms.UUIDField(required=False, widget=forms.HiddenInput, initial=uuid.uuid4)


def _parsed(parse, text: str, field: str):
    """``parse(text=text)`` (a service's parser), its InvalidInput turned into this field's
    error (without the leading ``field:``, which the form shows by placement)."""
    from projects.services import InvalidInput

    try:
        return parse(text=text, field=field)
    except InvalidInput as exc:
        message = str(exc).removeprefix(f"{field}: ")
        raise forms.ValidationError(message[:1].upper() + message[1:]) from None


class ProjectForm(forms.Form):
    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(max_length=200)
    task_type = forms.ChoiceField(choices=TaskType.choices)
    instructions = forms.CharField(widget=forms.Textarea(attrs={"rows": 5}), required=False,
                                   help_text="The teacher's system prompt.")
    labels = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), required=False,
                             help_text="Classification: one label per line (or comma-separated).")
    output_schema = forms.CharField(widget=forms.Textarea(attrs={"rows": 6}), required=False,
                                    help_text="Extraction: the JSON Schema every answer must validate against.")

    few_shot = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), required=False,
                               help_text='Few-shot examples for the teacher: one JSON object per line, '
                                         '{"query": "...", "answer": "..."}.')
    split_train = forms.FloatField(min_value=0, max_value=1, required=False, initial=0.8,
                                   help_text="Fraction of the queries for training (default 0.8).")
    split_validation = forms.FloatField(min_value=0, max_value=1, required=False, initial=0.1,
                                        help_text="Fraction for validation (default 0.1).")
    split_test = forms.FloatField(min_value=0, max_value=1, required=False, initial=0.1,
                                  help_text="Fraction held out for the test (default 0.1). The three must sum to 1; "
                                            "queries already imported keep their split.")

    def __init__(self, *args, teams=(), editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        from projects.models import Team

        if editing:
            del self.fields["team"]
            del self.fields["idempotency_key"]
        else:
            self.fields["team"].queryset = Team.objects.filter(pk__in=[t.pk for t in teams])

    @staticmethod
    def initial_for(project) -> dict:
        """The form's initial values for editing ``project``."""
        return {
            "name": project.name, "task_type": project.task_type, "instructions": project.instructions,
            "labels": "\n".join(project.labels or []),
            "output_schema": json.dumps(project.output_schema, indent=2) if project.output_schema is not None else "",
            "few_shot": "\n".join(json.dumps(x, ensure_ascii=False) for x in project.few_shot or []),
            "split_train": project.split_train, "split_validation": project.split_validation, "split_test": project.split_test,
        }

    def clean_few_shot(self) -> list[dict]:
        from projects.services.projects import project_parse_few_shot

        return _parsed(project_parse_few_shot, self.cleaned_data.get("few_shot") or "", "few_shot")

    def clean_labels(self) -> list[str]:
        raw = self.cleaned_data.get("labels") or ""
        parts = raw.replace(",", "\n").splitlines()
        return [p.strip() for p in parts if p.strip()]

    def clean_output_schema(self):
        from projects.services.projects import project_parse_schema

        return _parsed(project_parse_schema, self.cleaned_data.get("output_schema") or "", "output_schema")

    def service_kwargs(self) -> dict:
        d = self.cleaned_data
        kwargs = {"name": d["name"], "task_type": d["task_type"], "instructions": d["instructions"],
                  "labels": d["labels"], "output_schema": d["output_schema"], "few_shot": d["few_shot"],
                  "split_train": 0.8 if d.get("split_train") is None else d["split_train"],
                  "split_validation": 0.1 if d.get("split_validation") is None else d["split_validation"],
                  "split_test": 0.1 if d.get("split_test") is None else d["split_test"]}
        if "team" in self.fields:
            kwargs["team"] = d["team"]
        return kwargs

    idempotency_key = idempotency_key_field()


class QualityChecksForm(forms.Form):
    """The quality checks a teacher answer must pass (rejection sampling), in project Settings.
    Bounds come from ``projects.services.projects``; the judge is checked there too
    (``project_checks_judge``), so an error names its field here."""

    min_length = forms.IntegerField(min_value=0, max_value=MAX_ANSWER_CHARS, label="Minimum length (characters)",
                                    help_text="Answers shorter than this (after trimming spaces) are rejected.")
    max_length = forms.IntegerField(min_value=1, max_value=MAX_ANSWER_CHARS, label="Maximum length (characters)",
                                    help_text="Answers longer than this are rejected.")
    min_confidence = forms.FloatField(min_value=0, max_value=1, label="Minimum confidence (probability 0-1)",
                                      help_text="Classification with soft labels: an answer whose top label's "
                                                "probability is under this goes to review instead of the dataset.")
    refusal = forms.BooleanField(required=False, label="Reject refusals",
                                 help_text="Reject answers that open with a refusal (\"I'm sorry\", \"As an AI\", ... "
                                           "and the phrases below).")
    refusal_phrases = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False,
                                      label="More refusal phrases",
                                      help_text="One per line; an answer opening with one (any case) is a refusal.")
    judge = forms.CharField(max_length=300, required=False, label="LLM judge",
                            help_text="Blank: no judge. A teacher of this project by name, or a model to load as a local "
                                      "judge: a bundled name (smollm2-135m-instruct), a Hugging Face id org/name, or "
                                      "artifact:ID of this project.")
    judge_rubric = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False, label="Judge rubric",
                                   help_text="How the judge scores 1-5. Blank: the default rubric.")
    judge_min_score = forms.IntegerField(min_value=1, max_value=5, label="Judge threshold (score 1-5)",
                                         help_text="Answers the judge scores under this are rejected.")

    def __init__(self, *args, project=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.project = project

    @staticmethod
    def initial_for(project) -> dict:
        """The form's initial values: ``project``'s effective checks (defaults filled in)."""
        from workers.pipeline.checks import effective_checks

        e = effective_checks(project.checks, project.task_type)
        return {"min_length": e["min_length"], "max_length": e["max_length"], "min_confidence": e["min_confidence"],
                "refusal": e["refusal"], "refusal_phrases": "\n".join(e["refusal_phrases"]),
                "judge": e["judge_teacher"] or e["judge_model"] or "", "judge_rubric": e["judge_rubric"],
                "judge_min_score": e["judge_min_score"]}

    def clean_refusal_phrases(self) -> list[str]:
        return [p.strip() for p in (self.cleaned_data.get("refusal_phrases") or "").splitlines() if p.strip()]

    def clean_judge(self) -> str:
        from projects.services.projects import project_checks_judge

        value = (self.cleaned_data.get("judge") or "").strip()
        if value and self.project is not None:
            _checked(lambda v: project_checks_judge(project=self.project, judge=v), value)
        return value

    def clean(self):
        d = super().clean()
        lo, hi = d.get("min_length"), d.get("max_length")
        if lo is not None and hi is not None and hi < lo:
            self.add_error("max_length", f"Must be at least the minimum length ({lo}).")
        return d

    def changes(self) -> dict:
        """The ``changes`` for ``project_checks_update``: every setting of the form."""
        return {k: self.cleaned_data[k] for k in ("min_length", "max_length", "min_confidence", "refusal",
                                                  "refusal_phrases", "judge", "judge_rubric", "judge_min_score")}


class UploadForm(forms.Form):
    """A query file for the Queries page."""

    file = forms.FileField(help_text="CSV / TSV (a header row naming the columns), JSONL ({\"query\": ..., "
                                     "\"reference\": ...} or OpenAI chat \"messages\"), JSON, or plain text "
                                     "with one query per line. UTF-8, UTF-16 or Windows-1252.")
    text_column = forms.CharField(max_length=200, required=False,
                                  help_text="Column (name or number) with the query. Default: text / query / question / "
                                            "message / sentence, else the first column.")
    reference_column = forms.CharField(max_length=200, required=False,
                                       help_text="Optional column with the reference answer or label. Default: "
                                                 "reference / answer / label / category / intent if present.")
    header = forms.ChoiceField(required=False, label="Header row", initial="",
                               choices=[("", "Detect"), ("yes", "First row names the columns"), ("no", "No header row")],
                               help_text="CSV / TSV only. Without a header, columns are numbered 1, 2, ...")
    golden = forms.BooleanField(required=False, label="Golden set",
                                help_text="Import as the golden set (with references): used for evaluation, never for training.")


    def clean_header(self) -> bool | None:
        return {"yes": True, "no": False}.get(self.cleaned_data.get("header") or "")


class QuerySearchForm(forms.Form):
    """Filters of the query list."""

    q = forms.CharField(required=False, max_length=500, label="Search")
    split = forms.ChoiceField(required=False, choices=[("", "All splits"), ("train", "Train"), ("validation", "Validation"),
                                                       ("test", "Test"), ("golden", "Golden")])
    after = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)
    before = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)


# --- Generation -------------------------------------------------------------------------------


class TeacherForm(forms.Form):
    """A teacher's settings. The API key is never entered here: name the environment variable
    of the worker that holds it."""

    name = forms.CharField(max_length=100)
    provider = forms.ChoiceField(choices=Teacher.Provider.choices)
    model = forms.CharField(max_length=300, required=False,
                            help_text="API: the model name (gpt-4o-mini, llama3.1:8b, ...). Local: a bundled name "
                                      "(smollm2-135m-instruct, the default), a Hugging Face id (org/name) or "
                                      "artifact:<id> of this project.")
    model_artifact = forms.ModelChoiceField(
        queryset=None, required=False, label="Or a model trained here",
        help_text="Local teachers: a merged model trained in this project.",
        error_messages={"invalid_choice": "That is not a model artifact of this project."})
    base_url = forms.CharField(max_length=500, required=False, label="Base URL",
                               help_text="e.g. https://api.openai.com/v1. Empty: OpenAI. A local server "
                                         "(vLLM, Ollama, llama.cpp at 127.0.0.1) needs the operator's "
                                         "DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS.")
    api_key_env = forms.CharField(max_length=100, required=False, label="API key environment variable",
                                  help_text="The NAME of the variable that holds the key on the workers, e.g. "
                                            "OPENAI_API_KEY (one the operator allows).")
    temperature = forms.FloatField(initial=0.3, min_value=0, max_value=2)
    max_tokens = forms.IntegerField(initial=256, min_value=1, max_value=131072)
    top_logprobs = forms.IntegerField(required=False, min_value=0, max_value=20,
                                      help_text="API teachers: ask for this many log-probabilities per token (soft labels).")
    timeout_s = forms.FloatField(initial=60, min_value=0.1, max_value=3600, label="Timeout per request (s)")
    price_in_per_1m = forms.DecimalField(initial=0, min_value=0, decimal_places=6, max_digits=12,
                                         label="Price per 1M input tokens (USD)")
    price_out_per_1m = forms.DecimalField(initial=0, min_value=0, decimal_places=6, max_digits=12,
                                          label="Price per 1M output tokens (USD)")
    members = forms.ModelMultipleChoiceField(queryset=None, required=False, widget=forms.CheckboxSelectMultiple,
                                             help_text="Ensemble only: the teachers it combines.")

    def __init__(self, *args, project=None, editing=None, **kwargs):
        super().__init__(*args, **kwargs)
        from projects.models import Teacher

        self.project = project
        qs = Teacher.objects.filter(project=project).exclude(provider="ensemble")
        if editing is not None:
            qs = qs.exclude(pk=editing.pk)
            self.fields["provider"].disabled = True
        self.fields["members"].queryset = qs
        _artifact_choices(self.fields["model_artifact"], project, ("merged",))

    def clean_api_key_env(self) -> str:
        return _checked(lambda v: security.teacher_endpoint_check(base_url="", api_key_env=v),
                        self.cleaned_data.get("api_key_env") or "")

    def clean_base_url(self) -> str:
        return _checked(lambda v: security.teacher_endpoint_check(base_url=v, api_key_env=""),
                        (self.cleaned_data.get("base_url") or "").strip())

    def clean(self):
        d = super().clean()
        art = d.get("model_artifact")
        if art is not None:
            if d.get("provider") != "transformers":
                self.add_error("model_artifact", "Only a local (transformers) teacher runs a model trained here.")
            elif (d.get("model") or "").strip():
                self.add_error("model_artifact", "Give a model name or choose a model trained here, not both.")
            else:
                d["model"] = f"{security.ARTIFACT_PREFIX}{art.pk}"
        elif d.get("provider") == "transformers" and (d.get("model") or "").strip() and self.project is not None:
            try:
                d["model"] = security.model_ref_check(project=self.project, ref=d["model"], field="model",
                                                     kinds=("merged",))
            except ServiceError as exc:
                self.add_error("model", str(exc))
        return d

    def service_kwargs(self) -> dict:
        d = dict(self.cleaned_data)
        d.pop("model_artifact", None)
        d["members"] = list(d.get("members") or [])
        return d


class GenerateForm(forms.Form):
    """Options of a generation run (the Generate button)."""

    teachers = forms.ModelMultipleChoiceField(queryset=None, required=False, widget=forms.CheckboxSelectMultiple,
                                              help_text="None ticked: every teacher except ensemble members and the judge.")
    limit = forms.IntegerField(required=False, min_value=1, max_value=2**31 - 1,
                               help_text="Only N train queries (empty: all); which N: see Selection.")
    selection = forms.ChoiceField(
        choices=[("first", "First N by id"), ("diverse", "Diverse: N that cover the queries (MiniLM + k-means)")],
        initial="first", required=False,
        help_text="Diverse embeds the queries with the bundled MiniLM, clusters them into N groups and asks the "
                  "query nearest each group's centre; it also reports near-duplicate queries.")
    duplicate_threshold = forms.FloatField(required=False, min_value=0.5, max_value=1.0, initial=0.95,
                                           label="Near-duplicate threshold",
                                           help_text="Diverse only: cosine similarity at or above which two queries "
                                                     "count as near-duplicates (default 0.95).")
    samples_per_query = forms.IntegerField(initial=1, min_value=1, max_value=20,
                                           help_text="Rejection sampling: draw up to N answers per query, keep the first "
                                                     "that passes the checks (the best by the judge when one is set).")
    concurrency = forms.IntegerField(initial=16, min_value=1, max_value=512, help_text="Requests in flight per worker.")
    budget_usd = forms.DecimalField(required=False, min_value=0, decimal_places=4, max_digits=12, label="Budget (USD)",
                                    help_text="Stop before the run's cost would pass this (empty: no cap).")

    def __init__(self, *args, project=None, **kwargs):
        super().__init__(*args, **kwargs)
        from projects.models import Teacher

        self.fields["teachers"].queryset = Teacher.objects.filter(project=project).order_by("id")

    def service_kwargs(self) -> dict:
        d = self.cleaned_data
        return {"teachers": list(d["teachers"]) or None, "limit": d["limit"], "samples_per_query": d["samples_per_query"],
                "concurrency": d["concurrency"], "budget_usd": d["budget_usd"] or None,
                "selection": d.get("selection") or "first",
                "duplicate_threshold": d["duplicate_threshold"] if d.get("duplicate_threshold") is not None else 0.95}

    idempotency_key = idempotency_key_field()


class TeacherTuneForm(forms.Form):
    """Domain-tune a local teacher on the golden references (``teacher_tune_start``): which
    teacher, the training method and preset, an optional step cap and the new teacher's name."""

    teacher = forms.ModelChoiceField(queryset=None, label="Local teacher",
                                     help_text="A local (transformers) teacher of this project.",
                                     error_messages={"invalid_choice": "That is not a local teacher of this project."})
    method = forms.ChoiceField(choices=[("sft-lora", "SFT with LoRA (sft-lora)"), ("sft-full", "Full SFT (sft-full)")],
                               initial="sft-lora")
    preset = forms.ChoiceField(choices=[(p, f"{p} ({d})") for p, d in PRESET_DESCRIPTIONS.items()], initial="fast")
    max_steps = forms.IntegerField(required=False, min_value=1, max_value=1_000_000, label="Max steps",
                                   help_text="Stop after this many optimizer steps (blank: the preset's epochs).")
    name = forms.CharField(required=False, max_length=100, label="Name of the tuned teacher",
                           help_text="Blank: <teacher>-tuned.")
    idempotency_key = idempotency_key_field()

    def __init__(self, *args, project=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["teacher"].queryset = Teacher.objects.filter(
            project=project, provider=Teacher.Provider.TRANSFORMERS).order_by("id")

    def service_kwargs(self) -> dict:
        d = self.cleaned_data
        return {"teacher": d["teacher"], "method": d["method"], "preset": d["preset"], "name": d.get("name") or "",
                "overrides": {"max_steps": d["max_steps"]} if d.get("max_steps") else None,
                "idempotency_key": d.get("idempotency_key")}


class ResumeForm(forms.Form):
    """Resume a stopped generation run, optionally with a new budget (Django's DecimalField
    refuses NaN, Infinity and numbers over its digits)."""

    budget_usd = forms.DecimalField(required=False, min_value=Decimal("0.0001"), decimal_places=4, max_digits=12,
                                    label="Budget (USD)", help_text="Empty: keep the run's cap.")


# --- Evaluation -------------------------------------------------------------------------------


class EvaluationForm(forms.Form):
    """Start an evaluation: which split, optionally only the first N queries, and the hourly
    machine price used for local models' cost per 1K queries."""

    split = forms.ChoiceField(choices=[("test", "Held-out test split"), ("golden", "Golden set")], initial="test")
    limit = forms.IntegerField(min_value=1, max_value=2**31 - 1, required=False, help_text="Only the first N queries (blank: all).")
    price_per_hour_usd = forms.FloatField(min_value=0, max_value=1e6, required=False, label="Price per hour (USD)",
                                          help_text="Machine price for local models' cost per 1K queries "
                                                    "(blank: the project's setting, else $0.10/h CPU, $2.00/h GPU).")
    idempotency_key = idempotency_key_field()


# --- Training -------------------------------------------------------------------------------


def _hp_field(name: str, label: str) -> forms.Field:
    """An optional form field for hyperparameter ``name``, bounded by its range in
    ``workers.pipeline.training.HYPERPARAMS`` (Django's number fields also refuse inf/nan)."""
    from workers.pipeline.training import HYPERPARAMS, describe_range

    spec = HYPERPARAMS[name]
    cls = forms.IntegerField if spec.type is int else forms.FloatField
    return cls(required=False, min_value=spec.min, max_value=spec.max, label=label,
               help_text=f"{spec.help}; {describe_range(name)}")


class TrainForm(forms.Form):
    """The Train button's settings. Blank hyperparameter fields keep the preset's value;
    ``extra`` takes any other setting as ``key=value`` lines."""

    METHOD_CHOICES = [(m.value, f"{m.label} ({m.value})") for m in TrainingMethod]
    HP_FIELDS = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "max_length", "lora_r",
                 "lora_alpha", "target_modules", "temperature", "alpha", "feature_weight", "relation_weight", "uld_weight",
                 "early_stopping_patience", "eval_steps")

    method = forms.ChoiceField(choices=METHOD_CHOICES)
    student_model = forms.CharField(max_length=300, required=False,
                                    help_text="Bundled name (smollm2-135m-instruct, minilm-l6) or Hugging Face id "
                                              "(org/name); blank: the method's default.")
    student_artifact = forms.ModelChoiceField(
        queryset=None, required=False, label="Or start from a model trained here",
        help_text="A merged model (sft-lora, sft-full, logit-kd) or a classifier (classifier-kd) of this project.",
        error_messages={"invalid_choice": "That is not a model artifact of this project."})
    preset = forms.ChoiceField(choices=[(p, f"{p} ({d})") for p, d in PRESET_DESCRIPTIONS.items()])
    student_size = forms.ChoiceField(
        required=False, label="Student size",
        choices=[("", "full size (the student model above)")]
        + [(s, f"{s}: {d}") for s, d in STUDENT_SIZE_DESCRIPTIONS.items()],
        help_text="sft-full and logit-kd: the student is the project's local teacher cut to evenly spaced layers "
                  "(DistilBERT-style), then fully fine-tuned; leave the student model blank.")
    num_train_epochs = _hp_field("num_train_epochs", "Epochs")
    learning_rate = _hp_field("learning_rate", "Learning rate")
    per_device_train_batch_size = _hp_field("per_device_train_batch_size", "Batch size")
    max_length = _hp_field("max_length", "Max length (tokens)")
    lora_r = _hp_field("lora_r", "LoRA rank r")
    lora_alpha = _hp_field("lora_alpha", "LoRA alpha")
    target_modules = forms.CharField(required=False, label="LoRA target modules", help_text="comma-separated")
    temperature = _hp_field("temperature", "KD temperature T")
    alpha = _hp_field("alpha", "KD alpha")
    feature_weight = _hp_field("feature_weight", "logit-kd / classifier-kd: hidden-state (FitNets) weight")
    relation_weight = _hp_field("relation_weight", "logit-kd / classifier-kd: relation (similarity-preserving) weight")
    uld_weight = _hp_field("uld_weight", "logit-kd: cross-tokenizer (ULD) weight")
    early_stopping_patience = _hp_field("early_stopping_patience", "Early-stopping patience")
    eval_steps = _hp_field("eval_steps", "Validate every N steps (0: each epoch)")
    extra = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False,
                            help_text="Other settings, one key=value per line (e.g. warmup_ratio=0.1); "
                                      "the valid settings and ranges are in the table below.")

    def __init__(self, *args, project=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.project = project
        _artifact_choices(self.fields["student_artifact"], project, security.MODEL_ARTIFACT_KINDS)

    def _clean_student(self, d: dict) -> None:
        """The student as the service takes it: ``artifact:<id>`` for a chosen artifact, else the
        name, checked (bundled name or hub id; never a free path)."""
        art, name = d.get("student_artifact"), (d.get("student_model") or "").strip()
        if art is not None and name:
            self.add_error("student_artifact", "Give a model name or choose a model trained here, not both.")
        elif art is not None:
            d["student_model"] = f"{security.ARTIFACT_PREFIX}{art.pk}"
        elif name and self.project is not None:
            try:
                d["student_model"] = security.model_ref_check(project=self.project, ref=name, field="student_model")
            except ServiceError as exc:
                self.add_error("student_model", str(exc))

    def clean_extra(self) -> dict:
        return key_value_lines(self.cleaned_data.get("extra", ""))

    def clean(self):
        """Check every setting against the chosen method's settings and the ranges of
        ``workers.pipeline.training.HYPERPARAMS``; an error goes to the field that set it. The
        student is checked too (``_clean_student``)."""
        data = super().clean()
        self._clean_student(data)
        method, preset = data.get("method"), data.get("preset")
        if not method or not preset:
            return data
        size = data.get("student_size") or ""
        if size and method not in SIZE_METHODS:
            self.add_error("student_size", f"Student sizes are for {' and '.join(SIZE_METHODS)} (the student is the "
                                           f"local teacher cut to fewer layers), not {method}.")
        elif size and (data.get("student_model") or data.get("student_artifact")):
            self.add_error("student_size", "Leave the student model blank with a student size: the student is "
                                           "built from the local teacher.")
        from workers.pipeline.training import TrainingRefused, resolve_hyperparams

        extra = data.get("extra") or {}
        for key, value in self.overrides().items():
            try:
                resolve_hyperparams(method, preset, {key: value})
            except TrainingRefused as exc:
                field = key if key in self.HP_FIELDS and key not in extra else "extra"
                if field in self.fields and field not in self.errors:
                    self.add_error(field, str(exc))
        return data

    def overrides(self) -> dict:
        """The hyperparameters the user set (blank fields left out)."""
        hp = {k: self.cleaned_data[k] for k in self.HP_FIELDS if self.cleaned_data.get(k) not in (None, "")}
        hp.update(self.cleaned_data.get("extra") or {})
        return hp

    idempotency_key = idempotency_key_field()


class SweepForm(forms.Form):
    """A hyperparameter sweep's settings: the method, student and preset as for Train, the
    search, the space (one swept hyperparameter per line) and the settings every trial shares.
    Its fields carry the prefix ``sweep`` (ids ``id_sweep-method``, ...): it shares the Students
    page with the Train form, whose field ids it would otherwise repeat."""

    prefix = "sweep"

    method = forms.ChoiceField(choices=TrainForm.METHOD_CHOICES)
    student_model = forms.CharField(max_length=300, required=False,
                                    help_text="As for Train; blank: the method's default.")
    preset = forms.ChoiceField(choices=[(p, f"{p} ({d})") for p, d in PRESET_DESCRIPTIONS.items()])
    search = forms.ChoiceField(choices=[("grid", "Grid (every combination)"), ("random", "Random"),
                                        ("tpe", "Bayesian (Optuna TPE)")])
    space = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}), label="Search space",
        help_text="One hyperparameter per line: name=v1,v2,... (values; a grid takes only these) or "
                  "name=low:high, name=low:high:log (a range, random/TPE), e.g. learning_rate=1e-4,3e-4 "
                  "and alpha=0.3,0.7; ranges are checked against the settings table below.")
    fixed = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, label="Every trial",
                            help_text="Settings all trials share, one key=value per line (e.g. max_steps=50).")
    n_trials = forms.IntegerField(required=False, min_value=1, max_value=200, label="Trials",
                                  help_text="Grid: blank runs every point; random/TPE: blank is 10.")
    divergence_patience = forms.IntegerField(
        min_value=0, max_value=100, initial=2, label="Prune after",
        help_text="Stop a trial whose validation divergence from the teacher (falling fidelity, else rising "
                  "loss) grows this many evaluations in a row; 0: never.")
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0, required=False)

    def clean_space(self) -> dict:
        from workers.pipeline.sweeps import SweepRefused, parse_param_text

        out: dict = {}
        for i, line in enumerate(self.cleaned_data.get("space", "").splitlines(), 1):
            if not line.strip():
                continue
            try:
                name, spec = parse_param_text(line.strip())
            except SweepRefused as exc:
                raise forms.ValidationError(f"line {i}: {exc}") from None
            if name in out:
                raise forms.ValidationError(f"line {i}: {name!r} is given twice")
            out[name] = spec
        if not out:
            raise forms.ValidationError("give at least one hyperparameter, e.g. learning_rate=1e-4,3e-4")
        return out

    def clean_fixed(self) -> dict:
        return key_value_lines(self.cleaned_data.get("fixed", ""))
