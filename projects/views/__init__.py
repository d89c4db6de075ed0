"""Thin views, one module per page group; each module exports ``urlpatterns``."""
from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages
from django.http import HttpRequest

from projects.services import ServiceError


def call_service(request: HttpRequest, action: Callable[[], object], success: str,
                 errors: tuple[type[Exception], ...] = (ServiceError,)) -> bool:
    """Run one service call for a POST view: a raised ``errors`` exception becomes an error
    message, success a ``success`` message. Returns True when the call succeeded."""
    try:
        action()
    except errors as exc:
        messages.error(request, str(exc))
        return False
    messages.success(request, success)
    return True


def refresh_when_ended(request: HttpRequest, response, *, ended: bool):
    """For a polled htmx partial: once its job has ended, ask htmx to reload the whole page
    (``HX-Refresh``), so the page's state-dependent controls (Cancel, Resume) follow; the
    reloaded page no longer polls. Returns ``response``."""
    if ended and request.headers.get("HX-Request") == "true":
        response["HX-Refresh"] = "true"
    return response
