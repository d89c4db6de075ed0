"""The loop back from production (``serving_tick``): harvest logged teacher answers, the promote
rule, continuous distillation (retrain, propose the new student, use it), with real RequestLog
rows, a curated classification project and the real Celery worker running the beat task."""
from __future__ import annotations

import time

import pytest
from django.utils import timezone

from projects.services.serving_loop import SOURCE, deployment_use_candidate
from workers.runs.serving import serving_tick
from tests.conftest import wait_job
from tests.test_training import curated_banking

TICK_TASK = "workers.tasks.serving_tick_task"  # what Celery beat sends (CELERY_BEAT_SCHEDULE)


def _base_student(project):
    """A finished classifier-kd run and its artifact: the deployed student (never loaded here)."""
    from projects.models import ModelArtifact, TrainingRun

    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6",
                                     preset="fast", status="succeeded")
    return ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                        path=f"artifacts/{project.slug}/run-{run.pk}/classifier")


def _deploy(project, owner, **settings):
    from projects.services.deployments import deployment_create

    return deployment_create(project=project, name="support-intents", teacher=project.teachers.get(), user=owner,
                             student_artifact=_base_student(project), student_share=0.5, shadow_share=1.0,
                             **settings)


def _logs(dep, rows):
    """RequestLog rows ``(route, query, student answer, teacher answer, agreed)`` as the gateway writes them."""
    from projects.models import RequestLog

    now = timezone.now()
    RequestLog.objects.bulk_create([
        RequestLog(deployment=dep, route=route, query=q, response=s, teacher_response=t, agreed=agreed,
                   input_tokens=30, output_tokens=3, cost_usd=0.0001, upstream_ms=120.0, finish_reason="stop",
                   created_at=now) for route, q, s, t, agreed in rows])


def _tick_through_worker(dep, done, timeout=300.0):
    """Send the beat task to the worker and wait until ``done(dep)`` holds (no result backend).
    Generous deadline: the worker may still be busy on a loaded machine; the wait ends when it holds."""
    from distillhub.celery import app

    app.send_task(TICK_TASK)
    deadline = time.time() + timeout
    while time.time() < deadline:
        dep.refresh_from_db()
        if done(dep):
            return dep
        time.sleep(0.3)
    pytest.fail(f"the serving tick did not finish in {timeout:.0f} s")


def test_tick_through_the_worker_harvests_promotes_retrains_and_proposes_the_candidate(celery_worker, team, owner,
                                                                                        shared_data):
    from projects.models import GenerationRun, JobStatus, ModelArtifact, Query

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=6, val_per_label=2)
    a, b, c = project.labels
    dep = _deploy(project, owner, auto_promote=True, promote_window=4, promote_delta=0.3, retrain_every=4)
    _logs(dep, [("shadow", f"production question {i}", a, a, True) for i in range(4)]
          + [("teacher", "my production question about b", None, b, None),
             ("student", "only the student answered", c, None, None)])

    # 1. Beat's task on the worker: harvest 5 teacher answers, promote (4 shadow comparisons all
    #    agree: delta 0 < 0.3), and retrain (5 new samples >= 4).
    dep = _tick_through_worker(dep, lambda d: d.retrain_run_id is not None)
    run = GenerationRun.objects.get(project=project, options__source=SOURCE)
    assert (run.accepted, run.rejected) == (5, 0) and run.options["last_request"] == dep.harvested_upto
    assert Query.objects.filter(project=project, metadata__source=SOURCE, split="train").count() == 5
    assert dep.student_share == 1.0 and dep.version == 2
    promote = dep.versions.get(version=2)
    assert promote.action == "promote" and promote.note.startswith("auto: quality delta 0.0 %")
    assert dep.harvested_since_retrain == 0
    retrain = dep.retrain_run
    assert (retrain.method, retrain.student_model, retrain.preset) == ("classifier-kd", "minilm-l6", "fast")
    assert retrain.dataset_rows == 3 * 6 + 5  # the curated set now holds the production samples

    # 2. The retrain runs on the worker; the next tick proposes its classifier as the candidate.
    job = wait_job(retrain.job_id, timeout=900)
    assert job.status == JobStatus.SUCCEEDED, job.error
    new_art = ModelArtifact.objects.get(training_run=retrain, kind="classifier")
    dep = _tick_through_worker(dep, lambda d: d.candidate_artifact_id is not None)
    assert dep.candidate_artifact_id == new_art.pk and dep.student_artifact_id != new_art.pk
    # Nothing new to harvest, nothing to retrain: another tick changes nothing.
    assert serving_tick() == {}

    # 3. The candidate becomes the student: a new version, the candidate cleared.
    dep = deployment_use_candidate(deployment=dep, user=owner)
    assert dep.student_artifact_id == new_art.pk and dep.candidate_artifact_id is None and dep.version == 3
    assert dep.versions.get(version=3).action == "candidate"
    assert serving_tick() == {}  # the used candidate is not proposed again


@pytest.mark.django_db(transaction=True)
def test_tick_keeps_the_share_when_the_rule_fails_or_auto_promote_is_off(team, owner, shared_data):
    from projects.models import Deployment

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=0)
    a, b, _ = project.labels
    dep = _deploy(project, owner, auto_promote=True, promote_window=4, promote_delta=0.3)
    # 2 of 4 shadow comparisons disagree: delta 50 % is not under 30 %.
    _logs(dep, [("shadow", f"q{i}", a, a if i % 2 else b, bool(i % 2)) for i in range(4)])
    out = serving_tick()
    assert out == {dep.slug: [f"harvested 4 into run {dep.project.generation_runs.order_by('-id').first().pk}"]}
    dep.refresh_from_db()
    assert dep.student_share == 0.5 and dep.version == 1 and dep.retrain_run_id is None  # retrain_every 0: off
    assert dep.harvested_since_retrain == 4

    # All agree now, but auto_promote is off: the rule is ready and nothing happens by itself.
    other = _deploy_second(project, owner)
    _logs(other, [("shadow", f"r{i}", a, a, True) for i in range(4)])
    out = serving_tick()
    assert list(out) == [other.slug] and not any("promoted" in x for x in out[other.slug])
    assert Deployment.objects.get(pk=other.pk).student_share == 0.5


def _deploy_second(project, owner):
    from projects.services.deployments import deployment_create

    return deployment_create(project=project, name="support-intents-b", teacher=project.teachers.get(), user=owner,
                             student_artifact=_base_student(project), student_share=0.5, shadow_share=1.0,
                             auto_promote=False, promote_window=4, promote_delta=0.3)


@pytest.mark.django_db(transaction=True)
def test_candidate_is_proposed_even_when_its_evaluation_cannot_start(team, owner, shared_data):
    """The curated banking project has no test split: the candidate must still be proposed,
    the tick saying why no evaluation was queued (not an error that hides the candidate)."""
    from projects.models import ModelArtifact, TrainingRun

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=0)
    dep = _deploy(project, owner)
    rr = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6",
                                    preset="fast", status="succeeded")
    art = ModelArtifact.objects.create(project=project, training_run=rr, kind="classifier", path="artifacts/x/classifier")
    type(dep).objects.filter(pk=dep.pk).update(retrain_run=rr)
    out = serving_tick()
    dep.refresh_from_db()
    assert dep.candidate_artifact_id == art.pk
    [msg] = out[dep.slug]
    assert msg.startswith(f"candidate artifact {art.pk}; no evaluation: ") and "error" not in msg
