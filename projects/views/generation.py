"""Teacher data pages: teacher settings, the Generate button, runs with live progress, one run's
samples; Cancel and Resume."""
from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from projects import selectors
from projects.forms import GenerateForm, ResumeForm, TeacherForm, TeacherTuneForm
from projects.models import Sample
from projects.services import ServiceError
from projects.views import call_service, refresh_when_ended
from projects.services.generation import (generation_cancel, generation_resume, generation_start, teacher_create,
                                          teacher_update)


def _ctx(request, project, **extra) -> dict:
    return {"project": project, "section": "generation", "can_write": selectors.user_can_write(request.user, project.team),
            **extra}


def generation_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    runs = list(selectors.generation_runs(project)[:50])
    for r in runs:
        r.eta_s = selectors.generation_eta_s(r)
    return render(request, "generation/page.html", _ctx(
        request, project, teachers=project.teachers.prefetch_related("members").order_by("id"), runs=runs,
        teacher_form=TeacherForm(project=project), generate_form=GenerateForm(project=project),
        tune_form=TeacherTuneForm(project=project), golden_references=selectors.golden_references_sha256(project)[1],
        train_queries=project.queries.filter(split="train", golden=False).count()))


def teacher_new(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = TeacherForm(request.POST or None, project=project)
    if request.method == "POST" and form.is_valid():
        try:
            t = teacher_create(project=project, user=request.user, **form.service_kwargs())
        except ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Teacher “{t.name}” added.")
            return redirect("generation_page", slug=project.slug)
    return render(request, "generation/teacher_form.html", _ctx(request, project, form=form, teacher=None))


def teacher_edit(request, slug: str, teacher_id: int):
    teacher = selectors.teacher_for_user(request.user, slug, teacher_id)
    project = teacher.project
    initial = {f: getattr(teacher, f) for f in ("name", "provider", "model", "base_url", "api_key_env", "temperature",
                                                "max_tokens", "top_logprobs", "timeout_s", "price_in_per_1m",
                                                "price_out_per_1m")}
    initial["members"] = list(teacher.members.all())
    form = TeacherForm(request.POST or None, project=project, editing=teacher, initial=initial)
    if request.method == "POST" and form.is_valid():
        kwargs = form.service_kwargs()
        kwargs.pop("provider", None)
        if teacher.provider != "ensemble":
            kwargs.pop("members", None)
        try:
            teacher_update(teacher=teacher, user=request.user, **kwargs)
        except ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Teacher “{teacher.name}” saved.")
            return redirect("generation_page", slug=project.slug)
    return render(request, "generation/teacher_form.html", _ctx(request, project, form=form, teacher=teacher))


@require_POST
def generation_start_view(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = GenerateForm(request.POST, project=project)
    if not form.is_valid():
        messages.error(request, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("generation_page", slug=project.slug)
    try:
        run = generation_start(project=project, user=request.user, **form.service_kwargs(),
                               idempotency_key=form.cleaned_data.get("idempotency_key"))
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("generation_page", slug=project.slug)
    if run.reused:
        messages.info(request, f"Generation run {run.pk} is already queued or running with these settings; "
                               "showing it instead of starting another.")
    else:
        messages.success(request, f"Generation run {run.pk} queued.")
    return redirect("generation_run", slug=project.slug, run_id=run.pk)


@require_POST
def teacher_tune_view(request, slug: str):
    """Domain-tune a local teacher on the golden references; the run page of the training run."""
    from projects.services.training import teacher_tune_start

    project = selectors.project_for_user(request.user, slug)
    form = TeacherTuneForm(request.POST, project=project)
    if not form.is_valid():
        messages.error(request, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("generation_page", slug=project.slug)
    try:
        run = teacher_tune_start(project=project, user=request.user, **form.service_kwargs())
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("generation_page", slug=project.slug)
    messages.success(request, f"Tuning run {run.pk} queued: when it succeeds, the teacher "
                              f"“{run.hyperparams['teacher_tune']['name']}” appears on the Teacher data page.")
    return redirect("training_run", slug=project.slug, run_id=run.pk)


def generation_run_view(request, slug: str, run_id: int):
    run = selectors.generation_run_for_user(request.user, slug, run_id)
    status = request.GET.get("status", "")
    samples = Sample.objects.filter(run=run).select_related("query", "teacher").order_by("id")
    if status in ("accepted", "rejected", "failed"):
        samples = samples.filter(status=status)
    check = request.GET.get("check", "")
    if check:
        samples = samples.filter(failed_checks__contains=[check])
    page = Paginator(samples, 50).get_page(request.GET.get("page"))
    return render(request, "generation/run.html", _ctx(
        request, run.project, run=run, page=page, status=status, check=check, **_stats(run)))


def _stats(run) -> dict:
    return {"failed_checks": selectors.generation_failed_check_counts(run), "eta_s": selectors.generation_eta_s(run)}


def generation_run_stats(request, slug: str, run_id: int):
    """The run's live counters (an htmx partial that polls every 2 s while the run is active)."""
    run = selectors.generation_run_for_user(request.user, slug, run_id)
    response = render(request, "generation/_stats.html", {"run": run, "project": run.project, **_stats(run)})
    return refresh_when_ended(request, response, ended=run.job is None or run.job.ended)


@require_POST
def generation_run_cancel(request, slug: str, run_id: int):
    run = selectors.generation_run_for_user(request.user, slug, run_id)
    call_service(request, lambda: generation_cancel(run=run, user=request.user),
                 f"Cancel requested for run {run.pk}; it stops within seconds.")
    return redirect("generation_run", slug=run.project.slug, run_id=run.pk)


@require_POST
def generation_run_resume(request, slug: str, run_id: int):
    run = selectors.generation_run_for_user(request.user, slug, run_id)
    form = ResumeForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"budget_usd: {' '.join(form.errors['budget_usd'])}")
    else:
        budget = form.cleaned_data["budget_usd"]
        call_service(request, lambda: generation_resume(run=run, user=request.user, budget_usd=budget),
                     f"Run {run.pk} resumed: only its unfinished slots are asked.")
    return redirect("generation_run", slug=run.project.slug, run_id=run.pk)


urlpatterns = [
    path("p/<slug:slug>/generation/", generation_page, name="generation_page"),
    path("p/<slug:slug>/generation/teachers/new/", teacher_new, name="teacher_new"),
    path("p/<slug:slug>/generation/teachers/<int:teacher_id>/", teacher_edit, name="teacher_edit"),
    path("p/<slug:slug>/generation/start/", generation_start_view, name="generation_start"),
    path("p/<slug:slug>/generation/teachers/tune/", teacher_tune_view, name="teacher_tune"),
    path("p/<slug:slug>/generation/runs/<int:run_id>/", generation_run_view, name="generation_run"),
    path("p/<slug:slug>/generation/runs/<int:run_id>/stats/", generation_run_stats, name="generation_run_stats"),
    path("p/<slug:slug>/generation/runs/<int:run_id>/cancel/", generation_run_cancel, name="generation_run_cancel"),
    path("p/<slug:slug>/generation/runs/<int:run_id>/resume/", generation_run_resume, name="generation_run_resume"),
]
