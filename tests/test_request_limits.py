"""distillhub/request_limits.py: an oversized request body is refused from its Content-Length
before anything (the CSRF middleware, a form) reads it."""
from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from projects.models import Dataset

MB = 1024 * 1024


class UnreadableBody:
    """A wsgi.input that records every read and gives nothing: the body must never be read."""

    def __init__(self):
        self.reads = 0

    def read(self, *args):
        self.reads += 1
        raise AssertionError("the request body was read")

    def readline(self, *args):
        return self.read()


def csrf_client(user=None) -> Client:
    """A client that goes through the CSRF check as a browser does (with its cookie), so the
    CSRF middleware reads ``request.POST`` unless something refuses the request first."""
    client = Client(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = "a" * 32
    if user is not None:
        client.force_login(user)
    return client


def post_declared(client, url, length, *, content_type="multipart/form-data; boundary=xyz", **extra):
    body = UnreadableBody()
    # (The test client sets CONTENT_TYPE only for a non-empty ``data``: pass it as a header.)
    response = client.generic("POST", url, b"", **{"CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(length),
                                                   "wsgi.input": body, **extra})
    return response, body


@pytest.mark.django_db
def test_a_40_mb_login_post_is_refused_with_413_before_its_body_is_read():
    client = csrf_client()
    r, body = post_declared(client, "/login/", 40 * MB)
    assert r.status_code == 413 and body.reads == 0
    text = r.content.decode()
    assert "larger than the limit of 10 MB" in text and "DATA_UPLOAD_MAX_MEMORY_SIZE" in text
    assert r["Connection"] == "close"
    # Under Django's runserver (wsgiref), which answers a hop-by-hop header from the app with a
    # 500, the 413 comes without it.
    r, body = post_declared(client, "/login/", 40 * MB, SERVER_SOFTWARE="WSGIServer/0.2")
    assert r.status_code == 413 and body.reads == 0 and not r.has_header("Connection")
    # An unknown URL is bounded the same way.
    r, body = post_declared(client, "/no/such/page/", 11 * MB)
    assert r.status_code == 413 and body.reads == 0


@pytest.mark.django_db
def test_an_upload_over_the_upload_limit_is_refused_before_its_body_is_read(owner, project, settings):
    settings.MAX_UPLOAD_MB = 1
    url = reverse("queries_page", kwargs={"slug": project.slug})
    r, body = post_declared(csrf_client(owner), url, 2 * MB)
    assert r.status_code == 413 and body.reads == 0
    text = r.content.decode()
    assert "larger than the limit of 1 MB" in text and "DISTILLHUB_MAX_UPLOAD_MB" in text
    assert f"distill import --project {project.slug} FILE" in text
    assert Dataset.objects.count() == 0


@pytest.mark.django_db
def test_the_upload_view_takes_the_upload_limit_and_every_other_url_the_small_one(owner_client, project, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    settings.MAX_UPLOAD_MB = 1
    data = b"".join(b"query number %d\n" % i for i in range(600))  # about 10 KB
    url = reverse("queries_page", kwargs={"slug": project.slug})
    r = owner_client.post(url, {"file": SimpleUploadedFile("q.txt", data)})
    assert r.status_code == 302 and Dataset.objects.get().name == "q.txt"
    r = owner_client.post(reverse("project_settings", kwargs={"slug": project.slug}),
                          {"name": "x", "instructions": "y" * 10_000})
    assert r.status_code == 413 and "larger than the limit of" in r.content.decode()
    # Under the limits nothing changes.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * MB
    assert Client().post("/login/", {"username": "olivia", "password": "wrong"}).status_code == 200


@pytest.mark.django_db
def test_a_body_without_a_length_or_with_a_malformed_one_is_refused_unread():
    client = csrf_client()
    body = UnreadableBody()
    r = client.generic("POST", "/login/", b"", **{"CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": "",
                                                  "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": body})
    assert r.status_code == 411 and body.reads == 0 and "Content-Length" in r.content.decode()
    r, body = post_declared(client, "/login/", "12abc")
    assert r.status_code == 400 and body.reads == 0
    r, body = post_declared(client, "/login/", -5)
    assert r.status_code == 400 and body.reads == 0
