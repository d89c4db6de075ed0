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
        raw = self.cleaned_data.get("few_shot") or ""
        examples = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise forms.ValidationError(f"Line {i}: not valid JSON: {exc.msg}.")
            if not isinstance(row, dict) or "query" not in row or "answer" not in row:
                raise forms.ValidationError(f'Line {i}: needs the keys "query" and "answer".')
            answer = row["answer"] if isinstance(row["answer"], str) else json.dumps(row["answer"], ensure_ascii=False)
            examples.append({"query": str(row["query"]), "answer": answer})
        return examples

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
        kwargs = {"name": d["name"], "task_type": d["task_type"], "instructions": d["instructions"],
                  "labels": d["labels"], "output_schema": d["output_schema"], "few_shot": d["few_shot"],
                  "split_train": 0.8 if d.get("split_train") is None else d["split_train"],
                  "split_validation": 0.1 if d.get("split_validation") is None else d["split_validation"],
                  "split_test": 0.1 if d.get("split_test") is None else d["split_test"]}
        if "team" in self.fields:
            kwargs["team"] = d["team"]
        return kwargs


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
