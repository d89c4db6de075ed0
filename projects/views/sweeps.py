"""Sweeps pages: start a hyperparameter sweep from the Students page, a sweep's page with its
trials side by side (hyperparameters, validation loss, fidelity, state) and charts, polled with
htmx while a trial is active; cancel."""
from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from projects import charts, selectors
from projects.forms import SweepForm
from projects.models import JOB_ENDED
from projects.services import ServiceError
from projects.services.sweeps import sweep_cancel, sweep_start
from projects.views import call_service, refresh_when_ended


@require_POST
def sweep_start_view(request, slug: str):
    from projects.views.training import render_training_list

    project = selectors.project_for_user(request.user, slug)
    form = SweepForm(request.POST)
    if not form.is_valid():
        return render_training_list(request, project, sweep_form=form, status=400)
    d = form.cleaned_data
    try:
        sweep = sweep_start(project=project, method=d["method"], student_model=d["student_model"],
                            preset=d["preset"], search=d["search"], space=d["space"], fixed=d["fixed"],
                            n_trials=d.get("n_trials"), divergence_patience=d["divergence_patience"],
                            seed=d.get("seed") or 0, user=request.user)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return render_training_list(request, project, sweep_form=form, status=400)
    messages.success(request, f"Sweep {sweep.pk} started: {sweep.n_trials} trials ({sweep.search}); "
                              "the first is queued.")
    return redirect("sweep_page", slug=project.slug, sweep_id=sweep.pk)


def _context(request, sweep) -> dict:
    table = selectors.sweep_trials(sweep)
    for t in table["trials"]:
        t["param_values"] = ["—" if t["params"].get(p) is None else format(t["params"][p], "g")
                             if isinstance(t["params"][p], float) else t["params"][p] for p in table["params"]]
    live = sweep.status not in JOB_ENDED or any(t["status"] not in JOB_ENDED and t["run"] for t in table["trials"])
    return {"project": sweep.project, "section": "training", "sweep": sweep, "table": table,
            "charts": charts.sweep_figures(trials=table["trials"], params=table["params"]), "live": live,
            "can_write": selectors.user_can_write(request.user, sweep.project.team)}


def sweep_page(request, slug: str, sweep_id: int):
    sweep = selectors.sweep_for_user(request.user, slug, sweep_id)
    return render(request, "training/sweep.html", _context(request, sweep))


def sweep_live(request, slug: str, sweep_id: int):
    """The polled partial (table and charts); stops polling when the sweep has ended."""
    sweep = selectors.sweep_for_user(request.user, slug, sweep_id)
    ctx = _context(request, sweep)
    return refresh_when_ended(request, render(request, "training/_sweep_live.html", ctx), ended=not ctx["live"])


@require_POST
def sweep_cancel_view(request, slug: str, sweep_id: int):
    sweep = selectors.sweep_for_user(request.user, slug, sweep_id)
    call_service(request, lambda: sweep_cancel(sweep=sweep, user=request.user),
                 f"Sweep {sweep.pk} cancelled; its active trial stops within seconds.")
    return redirect("sweep_page", slug=slug, sweep_id=sweep.pk)


urlpatterns = [
    path("p/<slug:slug>/training/sweeps/start/", sweep_start_view, name="sweep_start"),
    path("p/<slug:slug>/training/sweeps/<int:sweep_id>/", sweep_page, name="sweep_page"),
    path("p/<slug:slug>/training/sweeps/<int:sweep_id>/live/", sweep_live, name="sweep_live"),
    path("p/<slug:slug>/training/sweeps/<int:sweep_id>/cancel/", sweep_cancel_view, name="sweep_cancel"),
]
