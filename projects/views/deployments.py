"""Deployments pages: a project's deployments with the create form and the team's gateway keys
(a new key shown once), and one deployment's page: monitoring charts, the promote rule and the
divergence alert, settings, versions with rollback, continuous distillation."""
from __future__ import annotations

import math

from django.conf import settings
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from projects import charts_serving, selectors, selectors_serving
from projects.serving_forms import DeploymentForm, GatewayKeyForm
from projects.services import InvalidInput, ServiceError
from projects.services.deployments import (deployment_create, deployment_promote, deployment_rollback,
                                           deployment_update, gateway_key_create, gateway_key_revoke)
from projects.services.serving_loop import deployment_harvest, deployment_retrain, deployment_use_candidate
from projects.views import call_service


def _list(request, project, *, form=None, key_form=None, new_key=None, status=200):
    return render(request, "deployments/list.html", {
        "project": project, "section": "deployments",
        "deployments": selectors_serving.deployments_for_project(project),
        "keys": selectors_serving.gateway_keys_for_team(project.team),
        "form": form or DeploymentForm(project=project), "key_form": key_form or GatewayKeyForm(),
        "new_key": new_key, "can_write": selectors.user_can_write(request.user, project.team),
        "gateway_url": getattr(settings, "GATEWAY_PUBLIC_URL", "http://127.0.0.1:8200/v1"),
    }, status=status)


def deployments_page(request, slug: str):
    return _list(request, selectors.project_for_user(request.user, slug))


@require_POST
def deployment_create_view(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    form = DeploymentForm(request.POST, project=project)
    if not form.is_valid():
        return _list(request, project, form=form, status=400)
    try:
        dep = deployment_create(project=project, name=form.cleaned_data["name"], user=request.user, **form.settings())
    except ServiceError as exc:
        form.add_error(None, str(exc))
        return _list(request, project, form=form, status=400)
    messages.success(request, f"Deployment {dep.slug} created (version 1).")
    return redirect("deployment_detail", slug=slug, deployment_id=dep.pk)


@require_POST
def gateway_key_create_view(request, slug: str):
    """Create a key and render the list with the raw key in it: the only time it is shown
    (never stored, never put in a session or a redirect)."""
    project = selectors.project_for_user(request.user, slug)
    form = GatewayKeyForm(request.POST)
    if not form.is_valid():
        return _list(request, project, key_form=form, status=400)
    try:
        row, raw = gateway_key_create(team=project.team, name=form.cleaned_data["name"], user=request.user)
    except ServiceError as exc:
        form.add_error(None, str(exc))
        return _list(request, project, key_form=form, status=400)
    response = _list(request, project, new_key={"row": row, "raw": raw})
    response["Cache-Control"] = "no-store"
    return response


@require_POST
def gateway_key_revoke_view(request, slug: str, key_id: int):
    key = selectors_serving.gateway_key_for_user(request.user, slug, key_id)
    call_service(request, lambda: gateway_key_revoke(key=key, user=request.user),
                 f"Key {key.prefix}… revoked; the gateway refuses it within seconds.")
    return redirect("deployments_page", slug=slug)


def deployment_detail(request, slug: str, deployment_id: int, form=None, status=200):
    dep = selectors_serving.deployment_for_user(request.user, slug, deployment_id)
    try:
        hours = float(request.GET.get("hours") or 6)
    except ValueError:
        hours = 6.0
    hours = min(max(hours, 0.1), 24 * 90) if math.isfinite(hours) else 6.0
    series = selectors_serving.deployment_timeseries(deployment=dep, hours=hours)
    figs = charts_serving.deployment_figures(series=series)
    initial = {f: getattr(dep, f) for f in ("teacher_url", "student_url", "student_model", "student_share",
                                            "confidence_threshold", "shadow_share", "promote_delta", "promote_window",
                                            "auto_promote", "alert_agreement", "alert_window", "retrain_every", "active")}
    initial.update(teacher=dep.teacher_id, student_artifact=dep.student_artifact_id)
    return render(request, "deployments/detail.html", {
        "project": dep.project, "section": "deployments", "dep": dep, "hours": hours,
        "live": selectors_serving.deployment_live_figures(deployment=dep),
        "charts": {k: v for k, v in figs.items() if v},
        "versions": dep.versions.select_related("user")[:50],
        "recent": selectors_serving.recent_requests(deployment=dep, limit=30),
        "form": form or DeploymentForm(project=dep.project, editing=True, initial=initial),
        "can_write": selectors.user_can_write(request.user, dep.project.team)}, status=status)


@require_POST
def deployment_update_view(request, slug: str, deployment_id: int):
    dep = selectors_serving.deployment_for_user(request.user, slug, deployment_id)
    form = DeploymentForm(request.POST, project=dep.project, editing=True)
    if not form.is_valid():
        return deployment_detail(request, slug, deployment_id, form=form, status=400)
    try:
        dep = deployment_update(deployment=dep, user=request.user, **form.settings())
    except ServiceError as exc:
        form.add_error(None, str(exc))
        return deployment_detail(request, slug, deployment_id, form=form, status=400)
    messages.success(request, f"Saved: deployment {dep.slug} is at version {dep.version}.")
    return redirect("deployment_detail", slug=slug, deployment_id=dep.pk)


def _action(name: str, fn, done: str):
    @require_POST
    def view(request, slug: str, deployment_id: int):
        dep = selectors_serving.deployment_for_user(request.user, slug, deployment_id)
        box = {}

        def act():
            box["r"] = fn(dep, request)

        call_service(request, act, done)
        return redirect("deployment_detail", slug=slug, deployment_id=dep.pk)

    view.__name__ = name
    return view


def _version(raw: str) -> int | None:
    """The version number posted by a Restore button; None (the previous version) when absent.
    Raises InvalidInput for anything but a whole number in range."""
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise InvalidInput(f"version: {raw[:20]!r} is not a version number")
    return int(raw)


deployment_promote_view = _action("deployment_promote_view", lambda d, r: deployment_promote(deployment=d, user=r.user),
                                  "Promoted: the student now answers 100 % of traffic (the teacher stays as fallback).")
deployment_rollback_view = _action(
    "deployment_rollback_view",
    lambda d, r: deployment_rollback(deployment=d, user=r.user,
                                     to_version=_version(r.POST.get("version", ""))),
    "Rolled back: the earlier settings are live again (as a new version).")
deployment_harvest_view = _action("deployment_harvest_view", lambda d, r: deployment_harvest(deployment=d, user=r.user),
                                  "Logged teacher answers were added as a production-traffic generation run.")
deployment_retrain_view = _action("deployment_retrain_view", lambda d, r: deployment_retrain(deployment=d, user=r.user),
                                  "A new student is training on the latest data; it will be proposed as the next candidate.")
deployment_candidate_view = _action("deployment_candidate_view",
                                    lambda d, r: deployment_use_candidate(deployment=d, user=r.user),
                                    "The candidate student is now in the A/B test.")


urlpatterns = [
    path("p/<slug:slug>/deployments/", deployments_page, name="deployments_page"),
    path("p/<slug:slug>/deployments/create/", deployment_create_view, name="deployment_create"),
    path("p/<slug:slug>/deployments/keys/create/", gateway_key_create_view, name="gateway_key_create"),
    path("p/<slug:slug>/deployments/keys/<int:key_id>/revoke/", gateway_key_revoke_view, name="gateway_key_revoke"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/", deployment_detail, name="deployment_detail"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/update/", deployment_update_view, name="deployment_update"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/promote/", deployment_promote_view, name="deployment_promote"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/rollback/", deployment_rollback_view, name="deployment_rollback"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/harvest/", deployment_harvest_view, name="deployment_harvest"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/retrain/", deployment_retrain_view, name="deployment_retrain"),
    path("p/<slug:slug>/deployments/<int:deployment_id>/candidate/", deployment_candidate_view, name="deployment_candidate"),
]
