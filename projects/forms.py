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


# --- Evaluation -------------------------------------------------------------------------------


class EvaluationForm(forms.Form):
    """Start an evaluation: which split, optionally only the first N queries, and the hourly
    machine price used for local models' cost per 1K queries."""

    split = forms.ChoiceField(choices=[("test", "Held-out test split"), ("golden", "Golden set")], initial="test")
    limit = forms.IntegerField(min_value=1, required=False, help_text="Only the first N queries (blank: all).")
    price_per_hour_usd = forms.FloatField(min_value=0, required=False, label="Price per hour (USD)",
                                          help_text="Machine price for local models' cost per 1K queries "
                                                    "(blank: the project's setting, else $0.10/h CPU, $2.00/h GPU).")
