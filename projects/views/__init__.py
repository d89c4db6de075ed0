"""Thin views, one module per page group; each module exports ``urlpatterns``."""
from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest

from projects.services import ServiceError


def flash_error(request: HttpRequest, exc: ServiceError) -> None:
    """Show a service error as a message on the next page."""
    messages.error(request, str(exc))
