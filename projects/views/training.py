"""Students pages: training runs with presets and the Train button, a run's page with its
live loss chart (htmx-polled while it runs), preflight, prompt templates and artifacts."""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.http import FileResponse, Http404
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from projects import charts, selectors
from projects.forms import SweepForm, TrainForm
from projects.services import ServiceError
from projects.views import call_service, refresh_when_ended
from projects.services.datasets import dataset_version_file
from projects.services.training import presets_table, training_cancel, training_resume, training_start


def training_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = TrainForm(initial={"method": "classifier-kd" if project.task_type == "classification" else "sft-lora",
                              "preset": "fast"}, project=project)
    return _list(request, project, form)


def _list(request, project, form, status: int = 200, sweep_form=None):
    if sweep_form is None:
        # A space of settings the prefilled method has (sft-lora has no KD alpha; its LoRA rank).
        classification = project.task_type == "classification"
        sweep_form = SweepForm(initial={
            "method": "classifier-kd" if classification else "sft-lora", "preset": "fast", "search": "grid",
            "space": "learning_rate=1e-4,3e-4\n" + ("alpha=0.3,0.7" if classification else "lora_r=8,16"),
            "divergence_patience": 2})
    return render(request, "training/list.html", {
        "project": project, "section": "training", "form": form, "sweep_form": sweep_form,
        "sweeps": selectors.sweeps(project)[:50],
        "runs": selectors.training_runs(project)[:100],
        "dataset_versions": selectors.dataset_versions(project),
        "presets": _presets_rows(),
        "can_write": selectors.user_can_write(request.user, project.team),
    }, status=status)


def render_training_list(request, project, *, sweep_form, status: int = 200):
    """The Students page with ``sweep_form`` (bound, with its errors) under Sweeps."""
    form = TrainForm(initial={"method": "classifier-kd" if project.task_type == "classification" else "sft-lora",
                              "preset": "fast"}, project=project)
    return _list(request, project, form, status=status, sweep_form=sweep_form)


def _presets_rows() -> list[dict]:
    out = []
    for method, by_preset in presets_table().items():
        names = list(by_preset)
        keys = sorted({k for hp in by_preset.values() for k in hp})
        out.append({"method": method, "names": names,
                    "rows": [(k, [by_preset[n].get(k, "—") for n in names]) for k in keys]})
    return out


@require_POST
def training_start_view(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = TrainForm(request.POST, project=project)
    if not form.is_valid():
        return _list(request, project, form, status=400)
    try:
        run = training_start(project=project, method=form.cleaned_data["method"],
                             student_model=form.cleaned_data["student_model"], user=request.user,
                             preset=form.cleaned_data["preset"], overrides=form.overrides(),
                             idempotency_key=form.cleaned_data.get("idempotency_key"),
                             student_size=form.cleaned_data.get("student_size") or "")
    except ServiceError as exc:
        messages.error(request, str(exc))
        return _list(request, project, form, status=400)
    if run.reused:
        messages.info(request, f"Training run {run.pk} is already queued or running with these settings; "
                               "showing it instead of starting another.")
    else:
        messages.success(request, f"Training run {run.pk} queued ({run.method}, {run.student_name}).")
    return redirect("training_run", slug=project.slug, run_id=run.pk)


def _chart_json(run) -> str:
    return json.dumps(charts.training_loss_figure(selectors.training_metrics(run)))


def _run_context(request, run) -> dict:
    metrics = selectors.training_metrics(run)
    last_train = next((m for m in reversed(metrics) if m["split"] == "train"), None)
    last_val = next((m for m in reversed(metrics) if m["split"] == "validation"), None)
    return {"project": run.project, "section": "training", "run": run, "job": run.job,
            "chart_json": _chart_json(run), "last_train": last_train, "last_val": last_val,
            "artifacts": run.artifacts.order_by("kind"),
            "live": run.job is not None and not run.job.ended,
            "can_write": selectors.user_can_write(request.user, run.project.team)}


def training_run_page(request, slug: str, run_id: int):
    run = selectors.training_run_for_user(request.user, slug, run_id)
    ctx = _run_context(request, run)
    ctx["hyperparams"] = sorted(run.hyperparams.items())
    ctx["preflight_items"] = sorted(run.preflight.items())
    return render(request, "training/run.html", ctx)


def training_run_live(request, slug: str, run_id: int):
    """The polled partial: progress, latest figures and the loss chart; stops polling when the
    run's job has ended."""
    run = selectors.training_run_for_user(request.user, slug, run_id)
    ctx = _run_context(request, run)
    return refresh_when_ended(request, render(request, "training/_live.html", ctx), ended=not ctx["live"])


@require_POST
def training_run_cancel(request, slug: str, run_id: int):
    run = selectors.training_run_for_user(request.user, slug, run_id)
    call_service(request, lambda: training_cancel(run=run, user=request.user),
                 f"Cancel requested for training run {run.pk}.")
    return redirect("training_run", slug=slug, run_id=run.pk)


@require_POST
def training_run_resume(request, slug: str, run_id: int):
    run = selectors.training_run_for_user(request.user, slug, run_id)
    call_service(request, lambda: training_resume(run=run, user=request.user),
                 f"Training run {run.pk} resumes from its last checkpoint.")
    return redirect("training_run", slug=slug, run_id=run.pk)


def training_artifact_download(request, slug: str, artifact_id: int):
    """Download an artifact: a file as is, a folder as a zip (stored, not compressed: weights
    do not compress)."""
    artifact = selectors.training_artifact_for_user(request.user, slug, artifact_id)
    media = Path(settings.MEDIA_ROOT).resolve()
    p = (media / artifact.path).resolve()
    if media not in p.parents or not p.exists():
        raise Http404("The artifact's files are missing")
    name = f"{slug}-run{artifact.training_run_id}-{artifact.kind}"
    if p.is_file():
        return FileResponse(open(p, "rb"), as_attachment=True, filename=p.name)
    tmp = tempfile.TemporaryFile()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            zf.write(f, arcname=f"{name}/{f.relative_to(p).as_posix()}")
    tmp.seek(0)
    return FileResponse(tmp, as_attachment=True, filename=f"{name}.zip", content_type="application/zip")


def dataset_version_download(request, slug: str, version_id: int):
    """Download a frozen dataset version: its file's bytes as stored (they hash to its sha256)."""
    version = selectors.dataset_version_for_user(request.user, slug, version_id)
    try:
        path = dataset_version_file(version=version)
    except ServiceError:
        raise Http404("The dataset version's file is missing") from None
    return FileResponse(open(path, "rb"), as_attachment=True, content_type="application/jsonl",
                        filename=f"{slug}-dataset-v{version.number}-{version.sha256[:12]}.jsonl")


urlpatterns = [
    path("p/<slug:slug>/training/", training_page, name="training_page"),
    path("p/<slug:slug>/training/start/", training_start_view, name="training_start"),
    path("p/<slug:slug>/training/runs/<int:run_id>/", training_run_page, name="training_run"),
    path("p/<slug:slug>/training/runs/<int:run_id>/live/", training_run_live, name="training_run_live"),
    path("p/<slug:slug>/training/runs/<int:run_id>/cancel/", training_run_cancel, name="training_run_cancel"),
    path("p/<slug:slug>/training/runs/<int:run_id>/resume/", training_run_resume, name="training_run_resume"),
    path("p/<slug:slug>/training/artifacts/<int:artifact_id>/download/", training_artifact_download,
         name="training_artifact_download"),
    path("p/<slug:slug>/datasets/<int:version_id>/download/", dataset_version_download,
         name="dataset_version_download"),
]
