"""Django forms: they parse and validate input; services do the writes."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

from django import forms

from projects.models import TaskType, Teacher, TrainingMethod
from projects.services import ServiceError
from projects.services import security
from workers.pipeline.training import PRESET_DESCRIPTIONS


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
                               help_text="Only the first N train queries (empty: all).")
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
                "concurrency": d["concurrency"], "budget_usd": d["budget_usd"] or None}

    idempotency_key = idempotency_key_field()


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
    num_train_epochs = _hp_field("num_train_epochs", "Epochs")
    learning_rate = _hp_field("learning_rate", "Learning rate")
    per_device_train_batch_size = _hp_field("per_device_train_batch_size", "Batch size")
    max_length = _hp_field("max_length", "Max length (tokens)")
    lora_r = _hp_field("lora_r", "LoRA rank r")
    lora_alpha = _hp_field("lora_alpha", "LoRA alpha")
    target_modules = forms.CharField(required=False, label="LoRA target modules", help_text="comma-separated")
    temperature = _hp_field("temperature", "KD temperature T")
    alpha = _hp_field("alpha", "KD alpha")
    feature_weight = _hp_field("feature_weight", "logit-kd: hidden-state (FitNets) weight")
    relation_weight = _hp_field("relation_weight", "logit-kd: relation (similarity-preserving) weight")
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
        out = {}
        for i, line in enumerate(self.cleaned_data.get("extra", "").splitlines(), 1):
            if not line.strip():
                continue
            if "=" not in line:
                raise forms.ValidationError(f"line {i}: write key=value")
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
        return out

    def clean(self):
        """Check every setting against the chosen method's settings and the ranges of
        ``workers.pipeline.training.HYPERPARAMS``; an error goes to the field that set it. The
        student is checked too (``_clean_student``)."""
        data = super().clean()
        self._clean_student(data)
        method, preset = data.get("method"), data.get("preset")
        if not method or not preset:
            return data
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
