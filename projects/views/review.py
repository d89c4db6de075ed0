"""Review pages (placeholder until its issue fills it in)."""
from __future__ import annotations

from django.shortcuts import render
from django.urls import path

from projects import selectors


def review_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    return render(request, "projects/placeholder.html", {"project": project, "title": "Review", "section": "review"})


urlpatterns = [
    path("p/<slug:slug>/review/", review_page, name="review_page"),
]
