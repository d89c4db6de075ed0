"""Domain-tuning a local teacher on the golden references (issue #15, part 2): the service's
refusals, and the real worker: the existing training code (sft-lora) on the golden rows of the
bundled SmolLM2, then the tuned teacher (artifact:ID of the merged model) answers a generation run."""
from __future__ import annotations

import pytest

from tests.conftest import wait_job
from tests.generation_fixtures import add_queries, banking77_rows, banking_project


def _golden(project, rows):
    from projects.models import Query, Split

    qs = add_queries(project, rows, split=Split.GOLDEN)
    Query.objects.filter(pk__in=[q.pk for q in qs]).update(golden=True)
    return qs


def test_teacher_tune_refuses_api_teachers_missing_references_and_taken_names(db, team, owner):
    from projects.models import TrainingRun
    from projects.services import InvalidInput, InvalidState
    from projects.services.generation import teacher_create
    from projects.services.training import teacher_tune_start

    project = banking_project(team, owner)
    add_queries(project, [("card missing", "card_arrival")])
    teacher_create(project=project, name="smol", provider="transformers", user=owner)
    teacher_create(project=project, name="api", provider="openai", model="gpt-4o-mini", api_key_env="OPENAI_API_KEY")
    with pytest.raises(InvalidState, match="no golden query with a reference"):
        teacher_tune_start(project=project, teacher="smol", user=owner)
    _golden(project, [("my card never came", "card_arrival"), ("what rate for euros", None)])
    with pytest.raises(InvalidInput, match="'api' is an openai teacher; only a local"):
        teacher_tune_start(project=project, teacher="api", user=owner)
    with pytest.raises(InvalidInput, match="no teacher named 'nobody'"):
        teacher_tune_start(project=project, teacher="nobody", user=owner)
    with pytest.raises(InvalidInput, match="method: a teacher is tuned with sft-lora or sft-full"):
        teacher_tune_start(project=project, teacher="smol", user=owner, method="logit-kd")
    with pytest.raises(InvalidInput, match="already has a teacher named 'api'"):
        teacher_tune_start(project=project, teacher="smol", user=owner, name="api")
    assert TrainingRun.objects.count() == 0
    run = teacher_tune_start(project=project, teacher="smol", user=owner, overrides={"max_steps": 1})
    # One golden row has a reference (the blank one is not a training row).
    assert run.dataset_rows == 1 and run.student_model == "smollm2-135m-instruct"
    assert run.hyperparams["rows_source"] == "golden"
    assert run.hyperparams["teacher_tune"]["name"] == "smol-tuned"
    assert run.student_prompt_template.startswith("[system]\nClassify the bank customer's message")


@pytest.mark.timeout(900)
def test_tuned_teacher_is_registered_and_generates(celery_worker, team, owner, shared_data):
    from projects.models import GenerationRun, ModelArtifact, Sample, Teacher
    from projects.services.generation import generation_start, teacher_create
    from projects.services.training import teacher_tune_start

    project = banking_project(team, owner)
    rows = banking77_rows(shared_data, per_intent=3)
    _golden(project, rows[::2])  # 6 golden rows with their intent as the reference
    train = add_queries(project, rows[1::2][:2])
    teacher_create(project=project, name="smol", provider="transformers", user=owner)

    run = teacher_tune_start(project=project, teacher="smol", user=owner,
                             overrides={"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 192})
    job = wait_job(run.job.pk, timeout=800)
    assert job.status == "succeeded", (job.message, job.error)
    run.refresh_from_db()
    assert run.preflight["train_rows"] == 6 and run.preflight["validation_source"] == "holdout"
    merged = ModelArtifact.objects.get(training_run=run, kind="merged")
    tuned = Teacher.objects.get(project=project, name="smol-tuned")
    assert tuned.provider == "transformers" and tuned.model == f"artifact:{merged.pk}"
    assert tuned.options["tuned_by_run"] == run.pk and tuned.options["tuned_from"] == Teacher.objects.get(name="smol").pk
    assert job.result["tuned_teacher"] == "smol-tuned"

    gen = generation_start(project=project, user=owner, teachers=["smol-tuned"])
    gjob = wait_job(gen.job.pk, timeout=300)
    assert gjob.status == "succeeded", (gjob.message, gjob.error)
    samples = list(Sample.objects.filter(run=gen))
    assert sorted(s.query_id for s in samples) == sorted(q.pk for q in train)
    assert all(s.teacher_id == tuned.pk and s.response in project.labels and s.label_probs for s in samples)
    assert GenerationRun.objects.get(pk=gen.pk).failed == 0
