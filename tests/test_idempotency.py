"""Double submits: the Train, Evaluate, Generate and New project forms carry a fresh
idempotency key per render, so the same form posted twice makes one object; and an identical
start while the first is still queued or running returns the first (also from the CLI, and
from two requests at the same moment)."""
from __future__ import annotations

import re
import threading
import uuid

import pytest
from django.db import connection
from django.urls import reverse

from tests.generation_fixtures import add_queries
from tests.test_training import curated_banking

KEY_FIELD = re.compile(r'<input type="hidden" name="idempotency_key" value="([0-9a-f-]{36})"')


def _key(client, url: str) -> str:
    """The idempotency key the page at ``url`` renders into its form (a fresh one each time)."""
    body = client.get(url).content.decode()
    m = KEY_FIELD.search(body)
    assert m, f"no idempotency_key field on {url}"
    return m.group(1)


def _post_twice(client, url: str, data: dict):
    r1 = client.post(url, data)
    r2 = client.post(url, data)
    return r1, r2


# --- (a) the same form posted twice ---------------------------------------------------------


def test_each_render_gets_a_fresh_key(owner_client, project):
    add_queries(project, [("where is my card", "card_arrival")])
    for name in ("training_page", "evaluation_page", "generation_page"):
        url = reverse(name, kwargs={"slug": project.slug})
        a, b = _key(owner_client, url), _key(owner_client, url)
        assert a != b and uuid.UUID(a).version == 4
    assert _key(owner_client, reverse("project_new")) != _key(owner_client, reverse("project_new"))


def test_train_form_posted_twice_makes_one_run(owner_client, team, owner, shared_data):
    from projects.models import Job, TrainingRun

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    key = _key(owner_client, reverse("training_page", kwargs={"slug": project.slug}))
    r1, r2 = _post_twice(owner_client, reverse("training_start", kwargs={"slug": project.slug}),
                         {"method": "classifier-kd", "student_model": "minilm-l6", "preset": "fast",
                          "idempotency_key": key})
    run = TrainingRun.objects.get(project=project)
    where = reverse("training_run", kwargs={"slug": project.slug, "run_id": run.pk})
    assert (r1.status_code, r1["Location"]) == (302, where) and (r2.status_code, r2["Location"]) == (302, where)
    assert Job.objects.filter(kind="training").count() == 1 and str(run.idempotency_key) == key
    # The second answer says it showed the run already queued rather than a new one.
    body = owner_client.get(where).content.decode()
    assert f"Training run {run.pk} is already queued" in body


def test_evaluate_form_posted_twice_makes_one_evaluation(owner_client, project):
    from projects.models import Evaluation, Job, Teacher

    add_queries(project, [("where is my card", "card_arrival"), ("card stolen", "lost_or_stolen_card")], split="test")
    Teacher.objects.create(project=project, name="t", provider="openai", model="m")
    key = _key(owner_client, reverse("evaluation_page", kwargs={"slug": project.slug}))
    r1, r2 = _post_twice(owner_client, reverse("evaluation_start", kwargs={"slug": project.slug}),
                         {"split": "test", "limit": "2", "idempotency_key": key})
    ev = Evaluation.objects.get(project=project)
    where = reverse("evaluation_detail", kwargs={"slug": project.slug, "evaluation_id": ev.pk})
    assert (r1.status_code, r1["Location"]) == (302, where) and (r2.status_code, r2["Location"]) == (302, where)
    assert Job.objects.filter(kind="evaluation").count() == 1 and str(ev.idempotency_key) == key


def test_generate_form_posted_twice_makes_one_run(owner_client, project):
    from projects.models import GenerationRun, Job
    from projects.services.generation import teacher_create

    add_queries(project, [("where is my card", "card_arrival"), ("card stolen", "lost_or_stolen_card")])
    t = teacher_create(project=project, name="api", provider="openai", model="gpt-4o-mini")
    key = _key(owner_client, reverse("generation_page", kwargs={"slug": project.slug}))
    r1, r2 = _post_twice(owner_client, reverse("generation_start", kwargs={"slug": project.slug}),
                         {"teachers": [t.pk], "samples_per_query": "1", "concurrency": "4", "idempotency_key": key})
    run = GenerationRun.objects.get(project=project)
    where = reverse("generation_run", kwargs={"slug": project.slug, "run_id": run.pk})
    assert (r1.status_code, r1["Location"]) == (302, where) and (r2.status_code, r2["Location"]) == (302, where)
    assert Job.objects.filter(kind="generation").count() == 1 and str(run.idempotency_key) == key


def test_new_project_form_posted_twice_makes_one_project(owner_client, team):
    from projects.models import Project

    key = _key(owner_client, reverse("project_new"))
    data = {"team": team.pk, "name": "Refund triage", "task_type": "classification", "labels": "refund\nother",
            "idempotency_key": key}
    r1, r2 = _post_twice(owner_client, reverse("project_new"), data)
    project = Project.objects.get(team=team, name="Refund triage")
    where = reverse("project_overview", kwargs={"slug": project.slug})
    assert (r1.status_code, r1["Location"]) == (302, where) and (r2.status_code, r2["Location"]) == (302, where)
    assert Project.objects.filter(team=team).count() == 1 and str(project.idempotency_key) == key
    # A fresh render (a new key) makes a second project, as a deliberate second click would.
    data["idempotency_key"] = _key(owner_client, reverse("project_new"))
    assert owner_client.post(reverse("project_new"), data).status_code == 302
    assert sorted(Project.objects.filter(team=team).values_list("slug", flat=True)) == ["refund-triage", "refund-triage-2"]


def test_a_key_is_scoped_to_its_team(client, team, owner, other_team, outsider):
    """Another team's key neither finds nor blocks anything: a user cannot learn whether a key
    exists elsewhere, and the same key in two teams makes two projects."""
    from projects.models import Project

    key = str(uuid.uuid4())
    client.force_login(owner)
    client.post(reverse("project_new"), {"team": team.pk, "name": "Ours", "task_type": "summarization",
                                         "idempotency_key": key})
    client.force_login(outsider)
    r = client.post(reverse("project_new"), {"team": other_team.pk, "name": "Theirs", "task_type": "summarization",
                                             "idempotency_key": key})
    theirs = Project.objects.get(team=other_team)
    assert r.status_code == 302 and r["Location"] == reverse("project_overview", kwargs={"slug": theirs.slug})
    assert (theirs.name, str(theirs.idempotency_key)) == ("Theirs", key)
    assert Project.objects.get(team=team).name == "Ours"


def test_a_malformed_key_is_a_named_form_error(owner_client, team):
    from projects.models import Project

    r = owner_client.post(reverse("project_new"), {"team": team.pk, "name": "X", "task_type": "summarization",
                                                   "idempotency_key": "not-a-uuid"})
    assert r.status_code == 200 and "idempotency_key" in r.content.decode()
    assert not Project.objects.exists()


# --- (b) an identical start while the first is active ----------------------------------------


def test_identical_training_start_returns_the_active_run(team, owner, shared_data):
    from projects.models import Job, JobStatus
    from projects.services.training import training_start

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    kw = dict(project=project, user=owner, method="classifier-kd", student_model="minilm-l6", preset="fast",
              overrides={"num_train_epochs": 2})
    first = training_start(**kw)
    again = training_start(**kw)
    assert again.pk == first.pk and again.job_id == first.job_id and again.reused and not first.reused
    other = training_start(**{**kw, "overrides": {"num_train_epochs": 3}})  # other parameters: a new run
    assert other.pk != first.pk and not other.reused
    Job.objects.filter(pk=first.job_id).update(status=JobStatus.RUNNING)
    assert training_start(**kw).pk == first.pk  # still running
    Job.objects.filter(pk=first.job_id).update(status=JobStatus.SUCCEEDED)
    after = training_start(**kw)  # ended: a new start is a new run
    assert after.pk not in (first.pk, other.pk)
    assert Job.objects.filter(kind="training").count() == 3


def test_identical_evaluation_start_returns_the_active_one(project, owner):
    from projects.models import Job, JobStatus, Teacher
    from projects.services.evaluation import evaluation_start

    add_queries(project, [("where is my card", "card_arrival")], split="test")
    Teacher.objects.create(project=project, name="t", provider="openai", model="m")
    first = evaluation_start(project=project, user=owner, options={"limit": 1})
    assert evaluation_start(project=project, user=owner, options={"limit": 1}).pk == first.pk
    assert evaluation_start(project=project, user=owner).pk != first.pk  # other options
    Job.objects.filter(pk=first.job_id).update(status=JobStatus.CANCELLED)
    assert evaluation_start(project=project, user=owner, options={"limit": 1}).pk != first.pk
    assert Job.objects.filter(kind="evaluation").count() == 3


def test_identical_generation_start_returns_the_active_run(project, owner):
    from projects.models import GenerationRun, Job, JobStatus
    from projects.services.generation import teacher_create, generation_start

    add_queries(project, [("where is my card", "card_arrival"), ("card stolen", "lost_or_stolen_card")])
    a = teacher_create(project=project, name="a", provider="openai", model="m1")
    teacher_create(project=project, name="b", provider="openai", model="m2")
    first = generation_start(project=project, user=owner, teachers=["a"], concurrency=4)
    again = generation_start(project=project, user=owner, teachers=[a], concurrency=4)
    assert again.pk == first.pk and again.reused
    assert generation_start(project=project, user=owner, teachers=["a", "b"], concurrency=4).pk != first.pk
    assert generation_start(project=project, user=owner, teachers=["a"], concurrency=4, limit=1).pk != first.pk
    Job.objects.filter(pk=first.job_id).update(status=JobStatus.FAILED)
    assert generation_start(project=project, user=owner, teachers=["a"], concurrency=4).pk != first.pk
    assert GenerationRun.objects.filter(project=project).count() == 4


def test_cli_train_twice_prints_the_same_run(team, owner, shared_data, capsys):
    import json

    from django.core.management import call_command

    from projects.models import TrainingRun

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    outs = []
    for _ in range(2):
        call_command("distill", "train", "--project", project.slug, "--method", "classifier-kd", "--student",
                     "minilm-l6", "--json")
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    run = TrainingRun.objects.get(project=project)
    assert outs[0] == outs[1] and outs[0]["run"] == run.pk and outs[0]["job"] == run.job_id


# --- at the same moment (two threads, two database connections) --------------------------


def _in_threads(n: int, fn) -> list:
    """Run ``fn()`` in ``n`` threads released together; returns their results (or raises the
    first error). Each thread closes its own database connection."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.django_db(transaction=True)
def test_concurrent_identical_starts_make_one_run(team, owner, shared_data):
    from projects.models import Job, TrainingRun
    from projects.services.training import training_start

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    for _ in range(3):  # a race lost once in a while would still show up
        TrainingRun.objects.all().delete()
        Job.objects.all().delete()
        runs = _in_threads(4, lambda: training_start(project=project, user=owner, method="classifier-kd",
                                                     student_model="minilm-l6", preset="fast"))
        assert len({r.pk for r in runs}) == 1
        assert TrainingRun.objects.count() == 1 and Job.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_posts_with_one_key_make_one_project(team, owner):
    from projects.models import Project
    from projects.services.projects import project_create

    for _ in range(3):
        key = uuid.uuid4()
        made = _in_threads(4, lambda: project_create(team=team, user=owner, name="Same click", task_type="summarization",
                                                     idempotency_key=key))
        assert len({p.pk for p in made}) == 1
        assert Project.objects.filter(idempotency_key=key).count() == 1
        Project.objects.all().delete()
