"""Teacher data pages (placeholder until its issue fills it in)."""
from __future__ import annotations

from django.shortcuts import render
from django.urls import path

from projects import selectors


def generation_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    return render(request, "projects/placeholder.html", {"project": project, "title": "Teacher data", "section": "generation"})


urlpatterns = [
    path("p/<slug:slug>/generation/", generation_page, name="generation_page"),
]
