"""Forms of the Deployments pages: they parse input; ``projects.services.deployments`` validates
the settings together and writes."""
from __future__ import annotations

from django import forms

from projects.models import ModelArtifact, Teacher
from projects.services.deployments import ARTIFACT_KINDS


class DeploymentForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Its slug is the `model` clients send to the gateway.")
    teacher = forms.ModelChoiceField(queryset=Teacher.objects.none(), empty_label=None)
    teacher_url = forms.CharField(max_length=500, required=False,
                                  help_text="Only for a local (transformers) teacher: where `distill serve-student --teacher` serves it.")
    student_artifact = forms.ModelChoiceField(queryset=ModelArtifact.objects.none(), required=False,
                                              help_text="A classifier is served inside the gateway; other kinds by `distill serve-student`.")
    student_url = forms.CharField(max_length=500, required=False,
                                  help_text="OpenAI-compatible endpoint serving the student (serve-student, vLLM, llama.cpp, Ollama).")
    student_model = forms.CharField(max_length=300, required=False, help_text="The model name at the student URL.")
    student_share = forms.FloatField(min_value=0, max_value=1, initial=0.05,
                                     help_text="Fraction of requests the student answers (0.05 = 5 %).")
    confidence_threshold = forms.FloatField(required=False,
                                            help_text="Classifier: top-label probability (e.g. 0.6); causal LM: mean token "
                                                      "log-probability (e.g. -0.5). Under it the teacher answers.")
    shadow_share = forms.FloatField(min_value=0, max_value=1, initial=0.0,
                                    help_text="Fraction of student answers also sent to the teacher to measure agreement.")
    promote_delta = forms.FloatField(min_value=0, max_value=1, initial=0.05,
                                     help_text="Promote when the live quality delta (1 - agreement) stays under this.")
    promote_window = forms.IntegerField(max_value=10 ** 9, min_value=1, initial=200, help_text="…over this many shadow comparisons.")
    auto_promote = forms.BooleanField(required=False, help_text="Promote to 100 % by itself when the rule holds.")
    alert_agreement = forms.FloatField(min_value=0, max_value=1, initial=0.9,
                                       help_text="Divergence alert when agreement falls under this…")
    alert_window = forms.IntegerField(max_value=10 ** 9, min_value=1, initial=100, help_text="…over this many shadow comparisons.")
    retrain_every = forms.IntegerField(max_value=10 ** 9, min_value=0, initial=0,
                                       help_text="Continuous distillation: retrain after this many new accepted production samples (0: off).")
    active = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args, project, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["teacher"].queryset = Teacher.objects.filter(project=project).exclude(provider="ensemble").order_by("name")
        self.fields["student_artifact"].queryset = (ModelArtifact.objects.filter(
            project=project, kind__in=sorted(ARTIFACT_KINDS)).order_by("-id"))
        self.fields["student_artifact"].label_from_instance = lambda a: f"#{a.pk} {a.kind} (run {a.training_run_id})"
        if editing:
            del self.fields["name"]

    def settings(self) -> dict:
        """The cleaned settings as service keyword arguments."""
        return {k: v for k, v in self.cleaned_data.items() if k != "name"}


class GatewayKeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses it, e.g. support-bot-prod.")

    def __init__(self, *args, **kwargs):
        # Its own element ids (id_key_name): the deployment form on the same page has a `name` too.
        kwargs.setdefault("auto_id", "id_key_%s")
        super().__init__(*args, **kwargs)
