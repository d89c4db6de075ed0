"""Request body limits, enforced before anything reads the body.

Django reads a body lazily, the first time something asks for ``request.POST`` or
``request.FILES`` (the CSRF middleware does, for every POST); by then a multipart upload has
already been streamed to a temporary file. ``RequestBodyLimitMiddleware``, first in
``MIDDLEWARE``, answers from the request's headers alone, so a refused body is never read:

- a view marked ``@upload_view`` (the Queries page's file upload) accepts
  ``settings.MAX_UPLOAD_MB`` MB (``DISTILLHUB_MAX_UPLOAD_MB``) plus ``MULTIPART_SLACK_BYTES`` for
  the multipart envelope and the form's other fields;
- every other URL accepts ``settings.DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes (10 MB), well above
  what any of its forms sends.

A larger declared ``Content-Length`` gets HTTP 413 naming the limit and its setting. A body sent
without a length (``Transfer-Encoding: chunked``) gets 411: Django's WSGI request never reads
past ``Content-Length`` (none means zero bytes), so such a body would otherwise arrive empty and
fail in a confusing way. A ``Content-Length`` that is not a whole number gets 400.

Under WSGI (gunicorn, ``runserver``) this is the whole story. Django's ASGI handler spools the
body before any middleware runs, so an ASGI deployment needs the same limit in its server or
proxy (e.g. nginx ``client_max_body_size``).
"""
from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.template.loader import render_to_string
from django.urls import Resolver404, resolve

#: Room for the multipart boundaries and the other form fields around an uploaded file.
MULTIPART_SLACK_BYTES = 64 * 1024

_MB = 1024 * 1024


def upload_view(view: Callable) -> Callable:
    """Mark ``view`` as a file-upload view: its requests may carry ``settings.MAX_UPLOAD_MB``
    MB (plus the multipart slack) instead of the small default. Returns ``view``."""
    view.accepts_upload = True
    return view


def body_limit(request: HttpRequest) -> tuple[int, str]:
    """``(bytes, setting)``: the largest body ``request``'s URL accepts, and the name of the
    setting that sets it. Resolves the URL only when asked (the caller asks for large bodies)."""
    try:
        match = resolve(request.path_info)
    except Resolver404:
        match = None
    if match is not None and getattr(match.func, "accepts_upload", False):
        return settings.MAX_UPLOAD_MB * _MB + MULTIPART_SLACK_BYTES, "DISTILLHUB_MAX_UPLOAD_MB"
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE, "DATA_UPLOAD_MAX_MEMORY_SIZE"


def _close_connection(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """Ask the server to close the connection after ``response`` (the body was not read, so the
    connection cannot carry another request), except under wsgiref (Django's ``runserver``),
    which refuses hop-by-hop headers from an application with an AssertionError (an HTTP 500)."""
    if not request.META.get("SERVER_SOFTWARE", "").startswith("WSGIServer/"):
        response["Connection"] = "close"
    return response


def _too_large(request: HttpRequest, limit: int, setting: str) -> HttpResponse:
    upload = setting == "DISTILLHUB_MAX_UPLOAD_MB"
    slug = None
    if upload:
        try:
            slug = resolve(request.path_info).kwargs.get("slug")
        except Resolver404:
            pass
    limit_mb = settings.MAX_UPLOAD_MB if upload else max(1, round(limit / _MB))
    body = render_to_string("request_too_large.html", {"limit_mb": limit_mb, "setting": setting,
                                                       "upload": upload, "slug": slug}, request=request)
    return _close_connection(request, HttpResponse(body, status=413))


class RequestBodyLimitMiddleware:
    """Refuse a request whose body is too large (413), has no length (411) or a malformed one
    (400) before anything reads it. See the module docstring for the limits."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        raw = request.META.get("CONTENT_LENGTH") or ""
        if not raw.strip():
            if request.META.get("HTTP_TRANSFER_ENCODING"):
                return _close_connection(request, HttpResponse(
                    "A request body needs a Content-Length header (chunked bodies are not accepted).\n",
                    status=411, content_type="text/plain; charset=utf-8"))
            return self.get_response(request)
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            return HttpResponseBadRequest("Content-Length is not a whole number of bytes.\n",
                                          content_type="text/plain; charset=utf-8")
        # Most bodies are small: resolve the URL only for one over the smaller of the two limits.
        if length > min(settings.DATA_UPLOAD_MAX_MEMORY_SIZE, settings.MAX_UPLOAD_MB * _MB):
            limit, setting = body_limit(request)
            if length > limit:
                return _too_large(request, limit, setting)
        return self.get_response(request)
