"""Deployments: the services (versions, promote, rollback, keys), the pages, the CLI verbs and the
loop back of logged teacher answers into a production-traffic generation run."""
from __future__ import annotations

import pytest
from django.utils import timezone

from projects.services import InvalidInput, InvalidState, NotAllowed
from tests.test_cli import distill, last_json


@pytest.fixture
def teacher(project, owner):
    from projects.services.generation import teacher_create

    return teacher_create(project=project, name="gpt", provider="openai", model="gpt-4o-mini",
                          base_url="http://127.0.0.1:9/v1", user=owner)


@pytest.fixture
def dep(project, owner, teacher):
    from projects.services.deployments import deployment_create

    return deployment_create(project=project, name="Support bot", teacher=teacher, user=owner,
                             student_url="http://127.0.0.1:8100/v1", student_model="student")


def test_versions_promote_and_rollback(dep, owner):
    from projects.services.deployments import deployment_promote, deployment_rollback, deployment_update

    assert dep.slug == "support-bot" and dep.version == 1 and dep.student_share == 0.05
    dep = deployment_update(deployment=dep, user=owner, student_share=0.2, shadow_share=0.5)
    assert dep.version == 2
    assert deployment_update(deployment=dep, user=owner, student_share=0.2).version == 2  # no change, no version
    dep = deployment_promote(deployment=dep, user=owner)
    assert (dep.version, dep.student_share) == (3, 1.0)
    with pytest.raises(InvalidState):
        deployment_promote(deployment=dep, user=owner)
    dep = deployment_rollback(deployment=dep, user=owner)
    assert (dep.version, dep.student_share, dep.shadow_share) == (4, 0.2, 0.5)
    dep = deployment_rollback(deployment=dep, user=owner, to_version=1)
    assert (dep.version, dep.student_share, dep.shadow_share) == (5, 0.05, 0.0)
    assert [(v.version, v.action, v.user_id) for v in dep.versions.order_by("version")] == [
        (1, "create", owner.pk), (2, "update", owner.pk), (3, "promote", owner.pk), (4, "rollback", owner.pk),
        (5, "rollback", owner.pk)]


def test_bad_settings_are_named(project, owner, teacher, viewer):
    from projects.services.deployments import deployment_create

    with pytest.raises(InvalidInput, match="student_url"):
        deployment_create(project=project, name="x", teacher=teacher, user=owner, student_url="ftp://host/v1",
                          student_model="m")
    with pytest.raises(InvalidInput, match="student_share"):
        deployment_create(project=project, name="x", teacher=teacher, user=owner, student_url="http://h/v1",
                          student_model="m", student_share=5)
    with pytest.raises(InvalidInput, match="student"):
        deployment_create(project=project, name="x", teacher=teacher, user=owner)
    with pytest.raises(InvalidInput, match="confidence_threshold"):
        deployment_create(project=project, name="x", teacher=teacher, user=owner, student_url="http://h/v1",
                          student_model="m", confidence_threshold=0.7)
    with pytest.raises(NotAllowed):
        deployment_create(project=project, name="x", teacher=teacher, user=viewer, student_url="http://h/v1",
                          student_model="m")


def test_keys_hashed_shown_once_and_revocable(owner_client, project, dep):
    from projects.models import GatewayKey

    r = owner_client.post(f"/p/{project.slug}/deployments/keys/create/", {"name": "support-bot-prod"})
    assert r.status_code == 200
    raw = r.context["new_key"]["raw"]
    assert raw.startswith("dh-") and raw in r.content.decode()
    assert r["Cache-Control"] == "no-store"
    row = GatewayKey.objects.get(team=project.team)
    assert row.key_hash != raw and len(row.key_hash) == 64 and raw.startswith(row.prefix)
    page = owner_client.get(f"/p/{project.slug}/deployments/").content.decode()
    assert raw not in page and row.prefix in page
    r = owner_client.post(f"/p/{project.slug}/deployments/keys/{row.pk}/revoke/")
    assert r.status_code == 302
    row.refresh_from_db()
    assert row.revoked_at is not None


def test_pages_are_guarded_by_team(client, outsider, project, dep, owner):
    from projects.services.deployments import gateway_key_create

    key, _ = gateway_key_create(team=project.team, name="k", user=owner)
    client.force_login(outsider)
    for url in (f"/p/{project.slug}/deployments/", f"/p/{project.slug}/deployments/{dep.pk}/"):
        assert client.get(url).status_code == 404
    for url in (f"/p/{project.slug}/deployments/{dep.pk}/promote/", f"/p/{project.slug}/deployments/keys/{key.pk}/revoke/"):
        assert client.post(url).status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_viewer_cannot_promote(client, viewer, project, dep):
    client.force_login(viewer)
    r = client.post(f"/p/{project.slug}/deployments/{dep.pk}/promote/", follow=True)
    assert "read-only" in r.content.decode()
    dep.refresh_from_db()
    assert dep.student_share == 0.05


def test_create_from_the_page_and_detail_with_charts(owner_client, project, teacher):
    from projects.models import Deployment, RequestLog

    r = owner_client.post(f"/p/{project.slug}/deployments/create/", {
        "name": "Web bot", "teacher": teacher.pk, "student_url": "http://127.0.0.1:8100/v1", "student_model": "s",
        "student_share": "0.1", "shadow_share": "0.5", "promote_delta": "0.05", "promote_window": "200",
        "alert_agreement": "0.9", "alert_window": "100", "retrain_every": "0", "active": "on"})
    assert r.status_code == 302, r.content.decode()[:2000]
    dep = Deployment.objects.get(slug="web-bot")
    now = timezone.now()
    RequestLog.objects.bulk_create([RequestLog(deployment=dep, route=route, latency_ms=ms, cost_usd=c, agreed=a,
                                               created_at=now, query="q")
                                    for route, ms, c, a in [("student", 5, 0, None), ("teacher", 50, 0.001, None),
                                                            ("shadow", 40, 0.001, True), ("fallback", 60, 0.001, None)]])
    r = owner_client.get(f"/p/{project.slug}/deployments/{dep.pk}/")
    assert r.status_code == 200
    assert set(r.context["charts"]) == {"agreement", "fallback_rate", "latency", "cost", "traffic"}
    assert r.context["live"]["fallback_rate"] == 0.5
    r = owner_client.post(f"/p/{project.slug}/deployments/create/", {"name": "Web bot", "teacher": teacher.pk,
                                                                     "student_share": "0.1", "shadow_share": "0",
                                                                     "promote_delta": "0.05", "promote_window": "1",
                                                                     "alert_agreement": "0.9", "alert_window": "1",
                                                                     "retrain_every": "0"})
    assert r.status_code == 400 and "student" in r.content.decode()


def test_harvest_turns_logged_teacher_answers_into_a_reviewable_run(project, dep, owner):
    from projects.models import Query, RequestLog, Sample
    from projects.services.serving_loop import deployment_harvest

    now = timezone.now()
    RequestLog.objects.bulk_create([
        RequestLog(deployment=dep, route="teacher", query="my card never came", response="card_arrival",
                   teacher_response="card_arrival", input_tokens=20, output_tokens=2, cost_usd=0.0001, created_at=now),
        RequestLog(deployment=dep, route="shadow", query="I lost my card", response="card_arrival",
                   teacher_response="lost_or_stolen_card", created_at=now),
        RequestLog(deployment=dep, route="fallback", query="refund?", teacher_response="Sorry, I cannot help.",
                   created_at=now),
        RequestLog(deployment=dep, route="student", query="student only", response="card_arrival", created_at=now),
        RequestLog(deployment=dep, route="teacher", status=429, query="failed", created_at=now),
    ])
    res = deployment_harvest(deployment=dep, user=owner)
    assert (res["requests"], res["accepted"], res["rejected"]) == (3, 2, 1)
    samples = {s.query.text: s for s in Sample.objects.filter(run_id=res["run"]).select_related("query", "run")}
    assert set(samples) == {"my card never came", "I lost my card", "refund?"}
    assert samples["I lost my card"].parsed == "lost_or_stolen_card"
    assert samples["refund?"].status == "rejected"  # enters the review queue like any rejected sample
    run = samples["refund?"].run
    assert run.options["source"] == "production traffic" and (run.accepted, run.rejected) == (2, 1)
    assert Query.objects.get(project=project, text="refund?").metadata["source"] == "production traffic"
    assert deployment_harvest(deployment=dep, user=owner)["requests"] == 0
    dep.refresh_from_db()
    assert dep.harvested_since_retrain == 2


@pytest.mark.django_db(transaction=True)
def test_cli_deploy_and_keys(project, teacher):
    r = distill("deploy", "create", "--project", project.slug, "--name", "cli bot", "--teacher", "gpt",
                "--student-url", "http://127.0.0.1:8100/v1", "--student-model", "s", "--share", "0.1", "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    assert (out["deployment"], out["version"], out["student_share"]) == ("cli-bot", 1, 0.1)
    assert out["live"]["total"] == 0
    r = distill("deploy", "promote", "cli-bot", "--json")
    assert r.returncode == 0 and last_json(r)["student_share"] == 1.0 and last_json(r)["version"] == 2
    r = distill("deploy", "rollback", "cli-bot", "--json")
    assert last_json(r)["student_share"] == 0.1 and last_json(r)["version"] == 3
    r = distill("deploy", "update", "cli-bot", "--share", "7", "--json")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: student_share: 7.0 must be between 0 and 1 "
                                                                     "(a fraction, e.g. 0.05 for 5 %)"]
    r = distill("gateway-key", "create", "--team", project.team.slug, "--name", "ci", "--json")
    assert r.returncode == 0, r.stderr
    key = last_json(r)
    assert key["key"].startswith(key["prefix"])
    r = distill("gateway-key", "revoke", "--team", project.team.slug, key["prefix"], "--json")
    assert r.returncode == 0 and last_json(r)["prefix"] == key["prefix"]
    r = distill("gateway-key", "revoke", "--team", project.team.slug, key["prefix"])
    assert r.returncode == 1 and "already revoked" in r.stderr


def test_endpoint_urls_pass_the_teacher_url_policy(project, owner, teacher, settings):
    """The gateway POSTs to student_url and teacher_url: they may reach only what a teacher's
    base_url may (workers/pipeline/security.py)."""
    from projects.services.deployments import deployment_create, deployment_update
    from projects.services.generation import teacher_create

    settings.ALLOW_PRIVATE_TEACHER_URLS = False
    local = teacher_create(project=project, name="local", provider="transformers", user=owner)
    with pytest.raises(InvalidInput, match=r"^teacher_url: 127\.0\.0\.1 is a loopback address"):
        deployment_create(project=project, name="a", teacher=local, user=owner, teacher_url="http://127.0.0.1:6379",
                          student_url="https://student.example.com/v1", student_model="x")
    with pytest.raises(InvalidInput, match=r"^student_url: 10\.0\.0\.5 is a private address"):
        deployment_create(project=project, name="b", teacher=teacher, user=owner, student_url="http://10.0.0.5:6379",
                          student_model="x")
    # Cloud metadata stays refused even where private addresses are allowed.
    settings.ALLOW_PRIVATE_TEACHER_URLS = True
    with pytest.raises(InvalidInput, match=r"^student_url: 169\.254\.169\.254 is a link-local address"):
        deployment_create(project=project, name="c", teacher=teacher, user=owner,
                          student_url="http://169.254.169.254/latest/meta-data", student_model="x")
    with pytest.raises(InvalidInput, match=r"^student_url: 'http://\[::1' is not a valid URL"):
        deployment_create(project=project, name="d", teacher=teacher, user=owner, student_url="http://[::1",
                          student_model="x")
    with pytest.raises(InvalidInput, match=r"^student_url: put no user name or password"):
        deployment_create(project=project, name="e", teacher=teacher, user=owner,
                          student_url="https://u:p@student.example.com/v1", student_model="x")
    dep = deployment_create(project=project, name="f", teacher=local, user=owner, teacher_url="http://127.0.0.1:8100/v1/",
                            student_url="https://student.example.com/v1", student_model="x")
    assert dep.teacher_url == "http://127.0.0.1:8100/v1"
    with pytest.raises(InvalidInput, match=r"^teacher_url: 169\.254\.169\.254"):
        deployment_update(deployment=dep, user=owner, teacher_url="http://169.254.169.254/v1")


def test_form_refuses_internal_urls_with_a_form_error(owner_client, project, teacher, settings):
    from projects.models import Deployment

    settings.ALLOW_PRIVATE_TEACHER_URLS = False
    r = owner_client.post(f"/p/{project.slug}/deployments/create/", {
        "name": "viaweb", "teacher": teacher.pk, "student_url": "http://169.254.169.254/v1", "student_model": "m",
        "student_share": "0.5", "shadow_share": "0", "promote_delta": "0.05", "promote_window": "200",
        "alert_agreement": "0.9", "alert_window": "100", "retrain_every": "0", "active": "on"})
    assert r.status_code == 400
    assert "student_url: 169.254.169.254 is a link-local address" in r.content.decode()
    assert not Deployment.objects.filter(slug="viaweb").exists()


def test_non_finite_and_huge_numbers_are_invalid_input(project, owner, teacher):
    from decimal import Decimal

    from projects.services.deployments import deployment_create

    base = dict(project=project, name="x", teacher=teacher, user=owner, student_url="http://127.0.0.1:8100/v1",
                student_model="m")
    cases = [
        ({"confidence_threshold": float("nan")}, r"^confidence_threshold: 'nan' is not a finite number"),
        ({"confidence_threshold": "-inf"}, r"^confidence_threshold: '-inf' is not a finite number"),
        ({"student_share": float("nan")}, r"^student_share: 'nan' is not a finite number"),
        ({"promote_window": 10 ** 11}, r"^promote_window: 100000000000 must be from 1 to 1000000000"),
        ({"alert_window": float("inf")}, r"^alert_window: inf is not a whole number"),
        ({"retrain_every": "99999999999"}, r"^retrain_every: 99999999999 must be from 0 to 1000000000"),
        ({"student_price_in_per_1m": "NaN"}, r"^student_price_in_per_1m: 'NaN' is not a finite number"),
        ({"student_price_out_per_1m": Decimal("Infinity")}, r"^student_price_out_per_1m: 'Infinity' is not a finite"),
        ({"student_price_out_per_1m": "1e20"}, r"^student_price_out_per_1m: must be from 0 to 999999"),
        ({"student_model": "x" * 400}, r"^student_model: at most 300 characters"),
    ]
    for fields, message in cases:
        with pytest.raises(InvalidInput, match=message):
            deployment_create(**{**base, **fields})
    dep = deployment_create(**{**base, "promote_window": 10 ** 9, "student_price_in_per_1m": "0.5"})
    assert dep.promote_window == 10 ** 9 and dep.student_price_in_per_1m == Decimal("0.5")


@pytest.mark.django_db(transaction=True)
def test_pages_answer_hostile_numbers_without_a_500(owner_client, project, dep):
    base = f"/p/{project.slug}/deployments/{dep.pk}/"
    for h in ("nan", "inf", "-inf", "1e400", "NaN"):
        r = owner_client.get(base + f"?hours={h}")
        assert r.status_code == 200 and r.context["hours"] in (6.0, 24 * 90, 0.1), (h, r.context["hours"])
    assert owner_client.get(base + "?hours=nan").context["hours"] == 6.0
    r = owner_client.post(base + "rollback/", {"version": "99999999999999999999"}, follow=True)
    assert r.status_code == 200 and "version: &#x27;99999999999999999999&#x27; is not a version number" in \
        r.content.decode()
    data = {"teacher": dep.teacher_id, "student_url": "http://127.0.0.1:8100/v1", "student_model": "x",
            "student_share": "0.1", "shadow_share": "0", "promote_delta": "0.05", "promote_window": "200",
            "alert_agreement": "0.9", "alert_window": "100", "retrain_every": "0", "active": "on"}
    for field, value, shown in (("promote_window", "99999999999999999999", "less than or equal to 1000000000"),
                                ("retrain_every", "99999999999", "less than or equal to 1000000000"),
                                ("student_url", "http://[::1", "student_url: &#x27;http://[::1&#x27; is not a valid URL")):
        r = owner_client.post(base + "update/", {**data, field: value})
        assert r.status_code == 400 and shown in r.content.decode(), field
    dep.refresh_from_db()
    assert dep.version == 1


@pytest.mark.django_db(transaction=True)
def test_cli_refuses_non_finite_and_huge_settings_in_one_line(project, teacher):
    from projects.models import Deployment

    common = ["deploy", "create", "--project", project.slug, "--teacher", "gpt", "--student-model", "s"]
    for i, (extra, message) in enumerate((
            (["--confidence-threshold", "nan"], "error: confidence_threshold: 'nan' is not a finite number"),
            (["--promote-window", "99999999999"], "error: promote_window: 99999999999 must be from 1 to 1000000000"),
            (["--student-url", "http://[::1"], "error: student_url: 'http://[::1' is not a valid URL"))):
        url = [] if "--student-url" in extra else ["--student-url", "http://127.0.0.1:8100/v1"]
        r = distill(*common, "--name", f"d{i}", *url, *extra)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [message], r.stderr
    assert not Deployment.objects.exists()


def test_serve_target_resolves_artifacts_within_the_media_folder(project, owner, settings):
    """`distill serve-student`: a local teacher's ``artifact:<id>`` and an --artifact folder load
    under a policy that allows exactly them; a stored path that leaves the media folder is refused."""
    from pathlib import Path

    from projects.models import ModelArtifact, Teacher
    from gateway.student import serve_target
    from workers.pipeline.local_lm import checked_policy
    from workers.pipeline.security import Refused, SecurityPolicy

    folder = Path(settings.MEDIA_ROOT) / "test-deployments" / project.slug / "merged"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    art = ModelArtifact.objects.create(project=project, kind="merged", path=f"test-deployments/{project.slug}/merged")
    Teacher.objects.create(project=project, name="lt", provider="transformers", model=f"artifact:{art.pk}")
    real = str(folder.resolve())
    for target in (serve_target(teacher=f"{project.slug}:lt"), serve_target(artifact_id=art.pk)):
        assert target.path == real
        assert checked_policy(target.path, target.policy) is target.policy  # loadable
        with pytest.raises(Refused):
            checked_policy(target.path, SecurityPolicy.from_env({}))  # not without that policy
    escape = ModelArtifact.objects.create(project=project, kind="classifier", path="../../../../etc")
    with pytest.raises(InvalidInput, match=rf"^--artifact: artifact {escape.pk}: its path leaves the media folder"):
        serve_target(artifact_id=escape.pk)
    other = ModelArtifact.objects.create(project=project, kind="classifier", path="x")
    Teacher.objects.create(project=project, name="bad", provider="transformers", model=f"artifact:{other.pk}")
    with pytest.raises(InvalidInput, match=rf"^--teacher: artifact {other.pk} is a classifier artifact; use a merged"):
        serve_target(teacher=f"{project.slug}:bad")


def test_slugs_are_unique_per_team_so_other_teams_names_never_collide(project, owner, teacher, other_team, outsider):
    from projects.services.deployments import deployment_create
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create

    mine = deployment_create(project=project, name="acme-secret-launch", teacher=teacher, user=owner,
                             student_url="http://127.0.0.1:8100/v1", student_model="x")
    pb = project_create(team=other_team, user=outsider, name="B proj", task_type="classification", labels=["a", "b"])
    tb = teacher_create(project=pb, name="api", provider="openai", model="gpt", user=outsider)
    theirs = deployment_create(project=pb, name="acme-secret-launch", teacher=tb, user=outsider,
                               student_url="http://127.0.0.1:8100/v1", student_model="x")
    assert (mine.slug, theirs.slug) == ("acme-secret-launch", "acme-secret-launch")
    assert (mine.team_id, theirs.team_id) == (project.team_id, other_team.pk)
    with pytest.raises(InvalidInput, match=rf"^name: team {other_team.slug} already has a deployment with slug "
                                           r"'acme-secret-launch'"):
        deployment_create(project=pb, name="Acme secret launch", teacher=tb, user=outsider,
                          student_url="http://127.0.0.1:8100/v1", student_model="x")
