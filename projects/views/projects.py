"""Projects list and the project overview (the loop as a row of stages)."""
from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path

from projects import selectors
from projects.forms import ProjectForm
from projects.services import ServiceError
from projects.services.projects import project_create


def project_list(request):
    projects = selectors.projects_for_user(request.user)
    teams = [m.team for m in request.user.memberships.select_related("team") if m.can_write]
    return render(request, "projects/list.html", {"projects": projects, "writable_teams": teams})


def project_new(request):
    teams = [m.team for m in request.user.memberships.select_related("team") if m.can_write]
    form = ProjectForm(request.POST or None, teams=teams)
    if request.method == "POST" and form.is_valid():
        try:
            project = project_create(user=request.user, **form.service_kwargs())
        except ServiceError as exc:
            form.add_error(None, str(exc))
        else:
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


urlpatterns = [
    path("", project_list, name="project_list"),
    path("projects/new/", project_new, name="project_new"),
    path("p/<slug:slug>/", project_overview, name="project_overview"),
]
