"""Access: every page needs a login; another team's objects answer 404 on every view that
takes an id; viewers read but cannot write."""
import re

import pytest
from django.urls import URLPattern, reverse

from projects import urls as project_urls
from projects.models import Job
from projects.services.jobs import job_create
from projects.services.projects import project_create


@pytest.fixture
def foreign(outsider, other_team):
    """One object of every kind a URL can name, all owned by another team. Each area adds the
    ids its URLs take here (a URL whose parameter is missing fails the test below)."""
    project = project_create(team=other_team, user=outsider, name="Secret project", task_type="generation")
    job = job_create(kind="selftest", team=other_team, project=project)
    ids = {"slug": project.slug, "job_id": job.pk}
    try:
        from tests.foreign_objects import foreign_ids  # areas extend this module
    except ImportError:  # pragma: no cover - before any area adds ids
        pass
    else:
        ids.update(foreign_ids(project=project, team=other_team, user=outsider))
    return ids


def _patterns():
    for p in project_urls.urlpatterns:
        assert isinstance(p, URLPattern)
        params = re.findall(r"<(?:\w+:)?(\w+)>", str(p.pattern))
        yield p.name, params


def test_every_page_needs_login(client, foreign):
    for name, params in _patterns():
        url = reverse(name, kwargs={k: foreign[k] for k in params})
        r = client.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/login/"), (name, r.status_code)


def test_other_teams_objects_answer_404_on_every_view(owner_client, foreign):
    checked = 0
    for name, params in _patterns():
        if not params:
            continue
        missing = [k for k in params if k not in foreign]
        assert not missing, f"URL {name!r} takes {missing}; add a foreign object for it in tests/foreign_objects.py"
        url = reverse(name, kwargs={k: foreign[k] for k in params})
        g = owner_client.get(url)
        p = owner_client.post(url)
        assert g.status_code in (404, 405), (name, "GET", g.status_code)
        assert p.status_code in (404, 405), (name, "POST", p.status_code)
        assert 404 in (g.status_code, p.status_code), name
        checked += 1
    assert checked >= 5


def test_project_list_shows_only_own_team(owner_client, project, foreign):
    r = owner_client.get(reverse("project_list"))
    assert r.status_code == 200
    body = r.content.decode()
    assert "Support intents" in body and "Secret project" not in body


def test_viewer_can_read_but_not_cancel(client, viewer, project):
    job = job_create(kind="selftest", team=project.team, project=project)
    client.force_login(viewer)
    assert client.get(reverse("project_overview", kwargs={"slug": project.slug})).status_code == 200
    r = client.get(reverse("job_detail", kwargs={"job_id": job.pk}))
    assert r.status_code == 200 and "Cancel</button>" not in r.content.decode()
    client.post(reverse("job_cancel", kwargs={"job_id": job.pk}))
    job.refresh_from_db()
    assert job.status == "queued" and not job.cancel_requested


def test_login_page_and_login_flow(client, owner):
    assert client.get("/login/").status_code == 200
    r = client.post("/login/", {"username": "olivia", "password": "correct-horse-42"})
    assert r.status_code == 302
    assert client.get("/").status_code == 200


def test_progress_partial_polls_only_while_running(owner_client, project):
    job = job_create(kind="selftest", team=project.team, project=project)
    r = owner_client.get(reverse("job_progress", kwargs={"job_id": job.pk}))
    assert 'hx-trigger="every 2s"' in r.content.decode()
    Job.objects.filter(pk=job.pk).update(status="succeeded", progress=1.0)
    r = owner_client.get(reverse("job_progress", kwargs={"job_id": job.pk}))
    body = r.content.decode()
    assert "hx-trigger" not in body and "100 %" in body


def test_job_page_reloads_when_its_job_ends_so_cancel_goes(owner_client, project):
    job = job_create(kind="selftest", team=project.team, project=project)
    page = owner_client.get(reverse("job_detail", kwargs={"job_id": job.pk})).content.decode()
    assert f'/jobs/{job.pk}/progress/?refresh=1"' in page and ">Cancel</button>" in page
    url = reverse("job_progress", kwargs={"job_id": job.pk})
    r = owner_client.get(url, {"refresh": "1"}, HTTP_HX_REQUEST="true")
    assert "HX-Refresh" not in r.headers  # still running
    Job.objects.filter(pk=job.pk).update(status="succeeded", progress=1.0)
    r = owner_client.get(url, {"refresh": "1"}, HTTP_HX_REQUEST="true")
    assert r.headers["HX-Refresh"] == "true"
    # A progress bar on another page (no refresh=1) never reloads its page.
    assert "HX-Refresh" not in owner_client.get(url, HTTP_HX_REQUEST="true").headers
    page = owner_client.get(reverse("job_detail", kwargs={"job_id": job.pk})).content.decode()
    assert ">Cancel</button>" not in page and "hx-trigger" not in page


def test_project_creation_from_the_browser(owner_client, team):
    r = owner_client.post(reverse("project_new"), {"team": team.pk, "name": "Spam filter", "task_type": "classification",
                                                   "labels": "spam\nham", "instructions": "Is it spam?"})
    assert r.status_code == 302
    from projects.models import Project

    p = Project.objects.get(slug="spam-filter")
    assert p.labels == ["spam", "ham"] and p.team == team


def test_bad_schema_is_shown_at_the_field(owner_client, team):
    r = owner_client.post(reverse("project_new"), {"team": team.pk, "name": "Extract", "task_type": "extraction",
                                                   "output_schema": '{"type": "objekt"}'})
    assert r.status_code == 200
    assert "not a valid JSON Schema" in r.content.decode()
