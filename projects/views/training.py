"""Students pages (placeholder until its issue fills it in)."""
from __future__ import annotations

from django.shortcuts import render
from django.urls import path

from projects import selectors


def training_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    return render(request, "projects/placeholder.html", {"project": project, "title": "Students", "section": "training"})


urlpatterns = [
    path("p/<slug:slug>/training/", training_page, name="training_page"),
]
