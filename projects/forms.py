"""Django forms: they parse and validate input; services do the writes."""
from __future__ import annotations

import json

from django import forms

from projects.models import TaskType


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

    def __init__(self, *args, teams=(), **kwargs):
        super().__init__(*args, **kwargs)
        from projects.models import Team

        self.fields["team"].queryset = Team.objects.filter(pk__in=[t.pk for t in teams])

    def clean_labels(self) -> list[str]:
        raw = self.cleaned_data.get("labels") or ""
        parts = raw.replace(",", "\n").splitlines()
        return [p.strip() for p in parts if p.strip()]

    def clean_output_schema(self):
        raw = (self.cleaned_data.get("output_schema") or "").strip()
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.")
        if not isinstance(value, dict):
            raise forms.ValidationError("A JSON Schema must be a JSON object.")
        return value

    def service_kwargs(self) -> dict:
        d = self.cleaned_data
        return {"team": d["team"], "name": d["name"], "task_type": d["task_type"], "instructions": d["instructions"],
                "labels": d["labels"], "output_schema": d["output_schema"]}


# --- Training -------------------------------------------------------------------------------


class TrainForm(forms.Form):
    """The Train button's settings. Blank hyperparameter fields keep the preset's value;
    ``extra`` takes any other setting as ``key=value`` lines."""

    METHOD_CHOICES = [("sft-lora", "SFT with LoRA (sft-lora)"), ("sft-full", "Full SFT (sft-full)"),
                      ("classifier-kd", "Classifier with soft-label KD (classifier-kd)"),
                      ("logit-kd", "Token-level logit KD (logit-kd)")]
    HP_FIELDS = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "max_length", "lora_r",
                 "lora_alpha", "target_modules", "temperature", "alpha", "early_stopping_patience", "eval_steps")

    method = forms.ChoiceField(choices=METHOD_CHOICES)
    student_model = forms.CharField(max_length=300, required=False,
                                    help_text="Bundled name (smollm2-135m-instruct, minilm-l6), HF id or folder; "
                                              "blank: the method's default.")
    preset = forms.ChoiceField(choices=[("fast", "fast (minutes on a CPU)"), ("seed", "seed (the seed recipe)")])
    num_train_epochs = forms.FloatField(required=False, min_value=0.01, label="Epochs")
    learning_rate = forms.FloatField(required=False, min_value=0, label="Learning rate")
    per_device_train_batch_size = forms.IntegerField(required=False, min_value=1, label="Batch size")
    max_length = forms.IntegerField(required=False, min_value=8, label="Max length (tokens)")
    lora_r = forms.IntegerField(required=False, min_value=1, label="LoRA rank r")
    lora_alpha = forms.IntegerField(required=False, min_value=1, label="LoRA alpha")
    target_modules = forms.CharField(required=False, label="LoRA target modules", help_text="comma-separated")
    temperature = forms.FloatField(required=False, min_value=0.01, label="KD temperature T")
    alpha = forms.FloatField(required=False, min_value=0, max_value=1, label="KD alpha")
    early_stopping_patience = forms.IntegerField(required=False, min_value=0, label="Early-stopping patience")
    eval_steps = forms.IntegerField(required=False, min_value=0, label="Validate every N steps (0: each epoch)")
    extra = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False,
                            help_text="Other settings, one key=value per line (e.g. warmup_ratio=0.1).")

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

    def overrides(self) -> dict:
        """The hyperparameters the user set (blank fields left out)."""
        hp = {k: self.cleaned_data[k] for k in self.HP_FIELDS if self.cleaned_data.get(k) not in (None, "")}
        hp.update(self.cleaned_data.get("extra") or {})
        return hp
