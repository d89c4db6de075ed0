"""Projects list and the project overview (the loop as a row of stages)."""
from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path

from projects import selectors
from projects.forms import ProjectForm, QualityChecksForm
from projects.services import ServiceError
from projects.services.projects import project_checks_update, project_create, project_update


def _add_service_error(form, exc) -> None:
    """Show a service error at the field it names (``field: message``), else above the form."""
    field, sep, rest = str(exc).partition(": ")
    if sep and field in form.fields:
        form.add_error(field, rest)
    else:
        form.add_error(None, str(exc))


def project_list(request):
    projects = selectors.projects_for_user(request.user)
    teams = [m.team for m in request.user.memberships.select_related("team") if m.can_write]
    return render(request, "projects/list.html", {"projects": projects, "writable_teams": teams})


def project_new(request):
    teams = [m.team for m in request.user.memberships.select_related("team") if m.can_write]
    form = ProjectForm(request.POST or None, teams=teams)
    if request.method == "POST" and form.is_valid():
        try:
            project = project_create(user=request.user, **form.service_kwargs(),
                                     idempotency_key=form.cleaned_data.get("idempotency_key"))
        except ServiceError as exc:
            _add_service_error(form, exc)
        else:
            if not project.reused:
                messages.success(request, f"Project “{project.name}” created. Next: upload its queries.")
            return redirect("project_overview", slug=project.slug)
    return render(request, "projects/form.html", {"form": form})


def project_overview(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    stages = selectors.project_stages(project)
    return render(
        request,
        "projects/overview.html",
        {"project": project, "section": "overview", "stages": stages, "can_write": selectors.user_can_write(request.user, project.team)},
    )


CHECKS_PREFIX = "checks"


def _checks_form(project, data=None) -> QualityChecksForm:
    return QualityChecksForm(data, project=project, prefix=CHECKS_PREFIX, initial=QualityChecksForm.initial_for(project))


def project_settings(request, slug: str):
    """Edit the task definition. Viewers see the form read-only (a POST answers 403)."""
    project = selectors.project_for_user(request.user, slug)
    can_write = selectors.user_can_write(request.user, project.team)
    form = ProjectForm(request.POST or None, editing=True, initial=ProjectForm.initial_for(project))
    status = 200
    if request.method == "POST":
        if not can_write:
            form.add_error(None, "Your role in this team is read-only (viewer); ask an owner for member access.")
            status = 403
        elif form.is_valid():
            try:
                project_update(project=project, user=request.user, **form.service_kwargs())
            except ServiceError as exc:
                _add_service_error(form, exc)
            else:
                messages.success(request, "Project settings saved.")
                return redirect("project_settings", slug=project.slug)
    return render(request, "projects/form.html",
                  {"form": form, "checks_form": _checks_form(project), "project": project, "section": "settings",
                   "can_write": can_write}, status=status)


def project_checks(request, slug: str):
    """Save the quality-check settings (the second form of the Settings page). Viewers get 403."""
    project = selectors.project_for_user(request.user, slug)
    can_write = selectors.user_can_write(request.user, project.team)
    if request.method != "POST":
        return redirect("project_settings", slug=project.slug)
    checks_form = _checks_form(project, request.POST)
    status = 400  # unless saved: the form comes back with its errors
    if not can_write:
        checks_form.add_error(None, "Your role in this team is read-only (viewer); ask an owner for member access.")
        status = 403
    elif checks_form.is_valid():
        try:
            project_checks_update(project=project, user=request.user, changes=checks_form.changes())
        except ServiceError as exc:
            _add_service_error(checks_form, exc)
        else:
            messages.success(request, "Quality checks saved; the next generation run uses them.")
            return redirect("project_settings", slug=project.slug)
    form = ProjectForm(editing=True, initial=ProjectForm.initial_for(project))
    return render(request, "projects/form.html",
                  {"form": form, "checks_form": checks_form, "project": project, "section": "settings",
                   "can_write": can_write}, status=status)


urlpatterns = [
    path("", project_list, name="project_list"),
    path("projects/new/", project_new, name="project_new"),
    path("p/<slug:slug>/", project_overview, name="project_overview"),
    path("p/<slug:slug>/settings/", project_settings, name="project_settings"),
    path("p/<slug:slug>/settings/checks/", project_checks, name="project_checks"),
]
