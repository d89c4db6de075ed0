"""Domain-tuning a local teacher on the golden references (issue #15, part 2): the service's
refusals, and the real worker: the existing training code (sft-lora) on the golden rows of the
bundled SmolLM2, then the tuned teacher (artifact:ID of the merged model) answers a generation run."""
from __future__ import annotations

import pytest

from tests.conftest import wait_job
from tests.generation_fixtures import add_queries, banking77_rows, banking_project
from tests.test_cli import distill, last_json


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
    from projects.models import GenerationRun, ModelArtifact, Sample, Teacher, TrainingRun
    from projects.services.generation import generation_start, teacher_create

    project = banking_project(team, owner)
    rows = banking77_rows(shared_data, per_intent=3)
    _golden(project, rows[::2])  # 6 golden rows with their intent as the reference
    train = add_queries(project, rows[1::2][:2])
    teacher_create(project=project, name="smol", provider="transformers", user=owner)

    teacher_create(project=project, name="api", provider="openai", model="gpt-4o-mini", api_key_env="OPENAI_API_KEY")
    r = distill("teacher", "tune", "--project", project.slug, "--teacher", "api", "--json")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
        "teacher: 'api' is an openai teacher; only a local (transformers) teacher can be tuned here "
        "(its weights must be on this machine)")

    r = distill("teacher", "tune", "--project", project.slug, "--teacher", "smol", "--set", "max_steps=2",
                "--set", "per_device_train_batch_size=2", "--set", "max_length=192", "--wait", "--json", timeout=800)
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    assert out["status"] == "succeeded" and out["teacher"] == "smol-tuned" and out["dataset_rows"] == 6
    run = TrainingRun.objects.get(pk=out["run"])
    job = run.job
    assert run.preflight["train_rows"] == 6 and run.preflight["validation_source"] == "holdout"
    merged = ModelArtifact.objects.get(training_run=run, kind="merged")
    tuned = Teacher.objects.get(project=project, name="smol-tuned")
    assert tuned.provider == "transformers" and tuned.model == f"artifact:{merged.pk}"
    assert tuned.options["tuned_by_run"] == run.pk and tuned.options["tuned_from"] == Teacher.objects.get(name="smol").pk
    assert job.result["tuned_teacher"] == "smol-tuned" and out["model"] == tuned.model
    assert job.message.endswith(f"; teacher smol-tuned added (artifact:{merged.pk})")
    assert run.hyperparams["max_steps"] == 2

    gen = generation_start(project=project, user=owner, teachers=["smol-tuned"])
    gjob = wait_job(gen.job.pk, timeout=300)
    assert gjob.status == "succeeded", (gjob.message, gjob.error)
    samples = list(Sample.objects.filter(run=gen))
    assert sorted(s.query_id for s in samples) == sorted(q.pk for q in train)
    assert all(s.teacher_id == tuned.pk and s.response in project.labels and s.label_probs for s in samples)
    assert GenerationRun.objects.get(pk=gen.pk).failed == 0


def test_tune_form_on_the_teacher_page_starts_a_tuning_run(owner_client, team, owner):
    from projects.models import TrainingRun
    from projects.services.generation import teacher_create

    project = banking_project(team, owner)
    smol = teacher_create(project=project, name="smol", provider="transformers", user=owner)
    api = teacher_create(project=project, name="api", provider="openai", model="gpt-4o-mini", api_key_env="OPENAI_API_KEY")
    url = f"/p/{project.slug}/generation/"
    page = owner_client.get(url).content.decode()
    assert "Domain-tune a local teacher" in page and "No golden query with a reference answer yet" in page
    _golden(project, [("my card never came", "card_arrival"), ("what rate for euros", "exchange_rate")])
    page = owner_client.get(url).content.decode()
    assert "(2 rows)" in page and 'id="tune-submit"' in page
    assert f'<option value="{smol.pk}">' in page and f'<option value="{api.pk}">' not in page

    r = owner_client.post(f"{url}teachers/tune/", {"teacher": api.pk, "method": "sft-lora", "preset": "fast"}, follow=True)
    assert "not a local teacher of this project" in r.content.decode() and TrainingRun.objects.count() == 0
    r = owner_client.post(f"{url}teachers/tune/", {"teacher": smol.pk, "method": "sft-full", "preset": "fast",
                                                   "max_steps": 3, "name": "smol-bank"}, follow=True)
    run = TrainingRun.objects.get()
    assert r.redirect_chain[-1][0] == f"/p/{project.slug}/training/runs/{run.pk}/"
    assert (run.method, run.dataset_rows, run.hyperparams["max_steps"]) == ("sft-full", 2, 3)
    assert run.hyperparams["teacher_tune"] == {"teacher": smol.pk, "name": "smol-bank"}
    body = r.content.decode()
    assert "Domain-tuning a local teacher on 2 golden references" in body and "<strong>smol-bank</strong>" in body
