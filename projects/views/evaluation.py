"""Evaluation pages: the list with the Evaluate button, one evaluation's figures and charts, and
the side-by-side browser of teacher and student answers."""
from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from projects import selectors
from projects.forms import EvaluationForm
from projects.services import ServiceError
from projects.services.evaluation import evaluation_start


CHART_ORDER = ("quality_by_model", "quality_vs_cost", "latency", "confusion", "training_loss", "history")


def evaluation_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    evaluations = list(selectors.evaluations_for_project(project)[:50])
    latest = next((e for e in evaluations if e.status == "succeeded"), None)
    return render(request, "evaluation/page.html", {
        "project": project, "section": "evaluation", "evaluations": evaluations, "latest": latest,
        "form": EvaluationForm(), "can_write": selectors.user_can_write(request.user, project.team)})


@require_POST
def evaluation_start_view(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = EvaluationForm(request.POST)
    if not form.is_valid():
        messages.error(request, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("evaluation_page", slug=project.slug)
    options = {k: form.cleaned_data[k] for k in ("limit", "price_per_hour_usd") if form.cleaned_data.get(k) is not None}
    try:
        ev = evaluation_start(project=project, user=request.user, split=form.cleaned_data["split"], options=options,
                              idempotency_key=form.cleaned_data.get("idempotency_key"))
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("evaluation_page", slug=project.slug)
    if ev.reused:
        messages.info(request, f"Evaluation {ev.pk} is already queued or running with these settings; "
                               "showing it instead of starting another.")
    else:
        messages.success(request, f"Evaluation {ev.pk} queued on the {ev.split} split.")
    return redirect("evaluation_detail", slug=project.slug, evaluation_id=ev.pk)


def evaluation_detail(request, slug: str, evaluation_id: int):
    ev = selectors.evaluation_for_user(request.user, slug, evaluation_id)
    results = list(ev.results.order_by("id"))
    summary = ev.summary or {}
    spec = summary.get("speculative_decoding")
    # jsonb does not keep key order: draw the charts in a fixed, readable order.
    stored = ev.charts or {}
    charts = {k: stored[k] for k in CHART_ORDER if k in stored}
    charts.update({k: v for k, v in stored.items() if k not in charts})
    pct = {k: (summary[k] * 100 if summary.get(k) is not None else None) for k in ("retention",)}
    if spec and spec.get("acceptance_rate") is not None:
        pct["acceptance"] = spec["acceptance_rate"] * 100
    return render(request, "evaluation/detail.html", {
        "project": ev.project, "section": "evaluation", "evaluation": ev, "results": results, "spec": spec,
        "charts": charts, "metric": summary.get("metric", "quality"), "pct": pct})


def evaluation_compare(request, slug: str, evaluation_id: int):
    """Side by side: the primary teacher's and one student's answers per query, by default only
    where they disagree; 25 rows a page."""
    ev = selectors.evaluation_for_user(request.user, slug, evaluation_id)
    try:
        student_id = int(request.GET.get("student") or 0) or None
    except ValueError:
        student_id = None
    only = request.GET.get("all") != "1"
    rows, student, teacher, students = selectors.eval_side_by_side(ev, student_result_id=student_id, disagreements_only=only)
    page = Paginator(rows, 25).get_page(request.GET.get("page"))
    return render(request, "evaluation/compare.html", {
        "project": ev.project, "section": "evaluation", "evaluation": ev, "page": page, "student": student,
        "teacher": teacher, "students": students, "only_disagreements": only})


urlpatterns = [
    path("p/<slug:slug>/evaluation/", evaluation_page, name="evaluation_page"),
    path("p/<slug:slug>/evaluation/start/", evaluation_start_view, name="evaluation_start"),
    path("p/<slug:slug>/evaluation/<int:evaluation_id>/", evaluation_detail, name="evaluation_detail"),
    path("p/<slug:slug>/evaluation/<int:evaluation_id>/compare/", evaluation_compare, name="evaluation_compare"),
]
