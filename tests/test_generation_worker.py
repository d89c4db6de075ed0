"""Generation runs end to end on the real Celery worker: the bundled local teacher on BANKING77
queries, an API fault that stops the run, cancel and resume."""
from __future__ import annotations

import math
import time

import pytest

from tests.conftest import wait_job
from tests.generation_fixtures import INTENTS, add_queries, banking77_rows, banking_project
from tests.openai_stub import StubServer


@pytest.mark.timeout(600)
def test_bundled_teacher_labels_20_banking77_queries_with_soft_labels(celery_worker, team, owner, shared_data):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_start, teacher_create
    from workers.pipeline.prompts import teacher_messages
    from projects.selectors import project_task_spec as _task_spec

    project = banking_project(team, owner)
    project.checks = {"min_confidence": 0.5}
    project.save()
    rows = banking77_rows(shared_data, per_intent=5)
    assert len(rows) == 20
    queries = add_queries(project, rows)
    add_queries(project, [("Where is my new card? It has been a week.", "card_arrival")], split="test")
    teacher = teacher_create(project=project, name="smol", provider="transformers", user=owner)
    assert teacher.model == "smollm2-135m-instruct"

    run = generation_start(project=project, user=owner, samples_per_query=3)
    job = wait_job(run.job.pk, timeout=540)
    assert job.status == "succeeded", (job.message, job.error)
    run = GenerationRun.objects.get(pk=run.pk)
    samples = list(Sample.objects.filter(run=run).select_related("query"))
    # Scored (not sampled) teacher: one sample per query even with samples_per_query=3; the
    # held-out (test) query is not answered.
    assert len(samples) == 20 and {s.query_id for s in samples} == {q.pk for q in queries}
    task = _task_spec(project)
    accepted = 0
    for s in samples:
        assert set(s.label_probs) == set(INTENTS) and math.isclose(sum(s.label_probs.values()), 1.0, abs_tol=1e-6)
        top = max(s.label_probs, key=s.label_probs.get)
        assert s.response == top and s.parsed == top
        assert s.prompt == teacher_messages(task, s.query.text)
        assert s.input_tokens > 30 and s.output_tokens >= 1 and s.latency_ms > 0
        names = {c["name"]: c["passed"] for c in s.checks}
        assert names["label_in_set"] is True
        assert names["confidence"] is (s.label_probs[top] >= 0.5)
        assert s.status == ("accepted" if s.label_probs[top] >= 0.5 else "rejected")
        accepted += s.status == "accepted"
    assert run.status == "succeeded" and run.accepted == accepted and run.rejected == 20 - accepted and run.failed == 0
    assert run.input_tokens == sum(s.input_tokens for s in samples) and float(run.cost_usd) == 0.0
    assert job.progress == 1.0 and job.result["accepted"] == accepted
    correct = sum(s.response == s.query.reference for s in samples)
    print(f"bundled teacher: {correct}/20 correct, {accepted} accepted at p>=0.5")


@pytest.fixture
def stub():
    s = StubServer(answer=lambda text: "card_arrival", delay_s=0.05).start()
    yield s
    s.stop()


@pytest.mark.timeout(600)  # an upper bound for a loaded CI machine
def test_insufficient_quota_fails_the_run_with_that_reason(celery_worker, team, owner, shared_data, stub):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_start, teacher_create

    project = banking_project(team, owner)
    add_queries(project, [(f"[quota] message {i}", "card_arrival") for i in range(10)])
    teacher_create(project=project, name="api", provider="openai", model="gpt-stub", base_url=stub.base_url)
    run = generation_start(project=project, user=owner, concurrency=2)
    job = wait_job(run.job.pk, timeout=120)
    run = GenerationRun.objects.get(pk=run.pk)
    assert job.status == "failed" and "insufficient_quota" in job.message
    assert run.status == "failed" and run.stop_reason.startswith("insufficient_quota")
    assert Sample.objects.filter(run=run).count() == 0
    assert sum(stub.attempts.values()) <= 2  # one per request in flight, none retried


@pytest.mark.timeout(600)  # an upper bound for a loaded CI machine
def test_cancel_within_seconds_then_resume_finishes_each_slot_once(celery_worker, team, owner, stub):
    from projects.models import GenerationRun, Job, Sample
    from projects.services.generation import generation_cancel, generation_resume, generation_start, teacher_create
    from projects.services import InvalidState

    stub.delay_s = 0.3
    project = banking_project(team, owner)
    add_queries(project, [(f"message number {i}", "card_arrival") for i in range(40)] + [("[500] flaky", "card_arrival")])
    teacher_create(project=project, name="api", provider="openai", model="gpt-stub", base_url=stub.base_url,
                   price_in_per_1m=2.5, price_out_per_1m=10)
    run = generation_start(project=project, user=owner, concurrency=2, chunk_size=10)
    deadline = time.time() + 180  # the worker may be busy on a loaded machine; ends at 4 samples
    while Sample.objects.filter(run=run).count() < 4 and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(InvalidState):
        generation_resume(run=GenerationRun.objects.get(pk=run.pk), user=owner)
    t0 = time.time()
    generation_cancel(run=GenerationRun.objects.get(pk=run.pk), user=owner)
    job = wait_job(run.job.pk, timeout=30)
    assert job.status == "cancelled" and time.time() - t0 < 15
    run = GenerationRun.objects.get(pk=run.pk)
    assert run.status == "cancelled" and run.stop_reason == "cancelled by user"
    done_before = Sample.objects.filter(run=run).count()
    assert 4 <= done_before < 41
    # A chunk on the other worker process finishes its in-flight requests (grace 2 s): wait until
    # the stub has none in flight (a loaded machine can take longer than the grace), then for the
    # answers to be written.
    deadline = time.time() + 120
    while stub.in_flight:
        assert time.time() < deadline, f"{stub.in_flight} requests still in flight after the cancel"
        time.sleep(0.1)
    time.sleep(4.0)
    done_before = Sample.objects.filter(run=run).count()
    time.sleep(1.0)
    assert Sample.objects.filter(run=run).count() == done_before  # nothing more after the cancel
    answered_before = stub.total_completed

    run = generation_resume(run=run, user=owner)
    old_job = job
    job = wait_job(run.job.pk, timeout=120)
    assert job.status == "succeeded" and job.pk != old_job.pk
    run = GenerationRun.objects.get(pk=run.pk)
    assert Sample.objects.filter(run=run).count() == 41 and run.accepted == 41 and run.status == "succeeded"
    # Resume asked only the unanswered queries: no query was answered twice.
    assert stub.total_completed == 41 and max(stub.completed.values()) == 1
    assert answered_before >= done_before
    assert float(run.cost_usd) == pytest.approx(41 * (20 * 2.5 + 5 * 10) / 1e6)
    assert Job.objects.get(pk=old_job.pk).status == "cancelled"


@pytest.mark.timeout(180)
def test_ensemble_of_api_teachers_votes_on_the_label(celery_worker, team, owner):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_start, teacher_create

    servers = [StubServer(answer=lambda text, a=a: a).start()
               for a in ("card_arrival", "Lost or stolen card", "lost_or_stolen_card")]
    try:
        project = banking_project(team, owner)
        add_queries(project, [("I can't find my card anywhere", "lost_or_stolen_card"), ("card missing", "lost_or_stolen_card")])
        members = [teacher_create(project=project, name=f"api{i}", provider="openai", model="m", base_url=s.base_url,
                                  price_in_per_1m=1, price_out_per_1m=1) for i, s in enumerate(servers)]
        ens = teacher_create(project=project, name="panel", provider="ensemble", members=[m.name for m in members])
        run = generation_start(project=project, user=owner)  # default: the ensemble, not its members
        assert list(run.teachers.all()) == [ens]
        job = wait_job(run.job.pk, timeout=120)
        assert job.status == "succeeded", job.error
        samples = list(Sample.objects.filter(run=run))
        assert len(samples) == 2 and {s.teacher_id for s in samples} == {ens.pk}
        for s in samples:
            assert s.response == "lost_or_stolen_card" and s.status == "accepted" and s.label_probs is None
            assert any(c["name"] == "ensemble" and "majority vote of 3" in c["reason"] for c in s.checks)
            assert s.input_tokens == 60 and float(s.cost_usd) == pytest.approx(75 / 1e6)
        assert all(sum(srv.completed.values()) == 2 for srv in servers)
        assert GenerationRun.objects.get(pk=run.pk).accepted == 2
    finally:
        for s in servers:
            s.stop()


@pytest.mark.timeout(600)
def test_a_bundled_model_named_as_judge_grades_every_answer(celery_worker, team, owner, stub):
    """The judge set in the quality checks as a model (not a teacher) is loaded on the worker
    as a local judge: every answer carries its score."""
    import re

    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_start, teacher_create
    from projects.services.projects import project_checks_update

    stub.answer = lambda text: f"Your card {text} arrives in 3 to 5 working days."
    project = banking_project(team, owner)
    project.task_type = "generation"
    project.save()
    add_queries(project, [("card one", None), ("card two", None)])
    teacher_create(project=project, name="api", provider="openai", model="gpt-stub", base_url=stub.base_url)
    checks = project_checks_update(project=project, user=owner, changes={
        "judge": "smollm2-135m-instruct", "judge_min_score": 1, "judge_rubric": "Score 5 if it answers the question."})
    assert checks["judge_model"] == "smollm2-135m-instruct" and checks["judge_teacher"] is None
    run = generation_start(project=project, user=owner)
    job = wait_job(run.job.pk, timeout=540)
    assert job.status == "succeeded", (job.message, job.error)
    samples = list(Sample.objects.filter(run=GenerationRun.objects.get(pk=run.pk)))
    assert len(samples) == 2
    for s in samples:
        judge = [c for c in s.checks if c["name"] == "judge"]
        assert len(judge) == 1, s.checks
        assert re.fullmatch(r"judge score [1-5]/5|the judge gave no score from 1 to 5", judge[0]["reason"]), judge
        assert s.status == ("accepted" if judge[0]["passed"] else "rejected")
