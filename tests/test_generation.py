"""projects/services/generation.py, the request side: teacher_create / teacher_update
validation and generation_start's argument checks and the run it creates. No worker: the
coordinator task is queued only after commit, which these (non-transactional) tests never reach.
The worker side is tests/test_generation_worker.py."""
from __future__ import annotations

from decimal import Decimal

import pytest

from projects.models import GenerationRun, Query, Teacher
from projects.services import InvalidInput, InvalidState, NotAllowed
from projects.services.generation import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_QUEUE,
    MAX_LIMIT,
    generation_start,
    teacher_create,
    teacher_update,
)

pytestmark = pytest.mark.django_db
URL = "http://127.0.0.1:9/v1"  # loopback: allowed in the tests (see conftest.py); never contacted


def api(project, name="gpt", **kw):
    kw.setdefault("provider", "openai")
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("base_url", URL)
    return teacher_create(project=project, name=name, **kw)


def add_queries(project, n, split="train", golden=False):
    Query.objects.bulk_create([Query(project=project, text=f"q{i}", text_hash=f"{split}{golden}{i}", split=split,
                                     golden=golden) for i in range(n)])


# --- teacher_create ------------------------------------------------------------------------------

def test_teacher_create_openai_stores_settings(project, owner):
    t = api(project, name="  gpt  ", api_key_env="OPENAI_API_KEY", temperature=0.7, max_tokens=64, top_logprobs=5,
            price_in_per_1m="0.15", price_out_per_1m=0.6, timeout_s=30, user=owner)
    t.refresh_from_db()
    assert (t.name, t.provider, t.model, t.base_url, t.api_key_env) == ("gpt", "openai", "gpt-4o-mini", URL,
                                                                         "OPENAI_API_KEY")
    assert (t.temperature, t.max_tokens, t.top_logprobs, t.timeout_s) == (0.7, 64, 5, 30.0)
    assert (t.price_in_per_1m, t.price_out_per_1m) == (Decimal("0.15"), Decimal("0.6"))


def test_teacher_create_transformers_defaults_to_smollm2(project):
    t = teacher_create(project=project, name="local", provider="transformers")
    assert t.model == "smollm2-135m-instruct"


@pytest.mark.parametrize("kw,message", [
    ({"name": " "}, r"^name: a teacher needs a name$"),
    ({"provider": "anthropic"}, r"^provider: 'anthropic' is not one of "),
    ({"model": ""}, r"^model: an openai teacher needs the model name"),
    ({"temperature": 2.5}, r"^temperature: 2.5 is outside 0-2$"),
    ({"temperature": float("nan")}, r"^temperature: nan is outside 0-2$"),
    ({"max_tokens": 0}, r"^max_tokens: 0 is outside 1-131072$"),
    ({"top_logprobs": 21}, r"^top_logprobs: 21 is outside 0-20$"),
    ({"price_in_per_1m": -1}, r"^price_in_per_1m: must be at least 0, got -1$"),
    ({"price_out_per_1m": "Infinity"}, r"^price_out_per_1m: 'Infinity' is not a finite number$"),
    ({"price_out_per_1m": "cheap"}, r"^price_out_per_1m: 'cheap' is not a number$"),
    ({"price_in_per_1m": 10**6}, r"^price_in_per_1m: 1000000 is too large"),
    ({"timeout_s": 0.01}, r"^timeout_s: 0.01 is outside 0.1-3600 seconds$"),
    ({"api_key_env": "sk-abcdef0123456789abcdef"}, r"^api_key_env: "),
    ({"api_key_env": "MY_SECRET_VAR"}, r"^api_key_env: MY_SECRET_VAR is not one of the key variables"),
    ({"base_url": "ftp://example.com/v1"}, r"^base_url: "),
    ({"model": "m" * 301}, r"^model: at most 300 characters, got 301$"),
    ({"name": "n" * 101}, r"^name: at most 100 characters, got 101$"),
])
def test_teacher_create_refuses_bad_fields(project, kw, message):
    args = {"name": "t", "provider": "openai", "model": "gpt-4o-mini", "base_url": URL} | kw
    with pytest.raises(InvalidInput, match=message):
        teacher_create(project=project, **args)
    assert not Teacher.objects.filter(project=project).exists()


def test_teacher_create_refuses_local_path_model(project):
    with pytest.raises(InvalidInput, match=r"^model: "):
        teacher_create(project=project, name="local", provider="transformers", model="/etc")


def test_teacher_name_unique_per_project(project):
    api(project)
    with pytest.raises(InvalidInput, match=r"^name: project \S+ already has a teacher named 'gpt'$"):
        api(project)


def test_teacher_create_viewer_refused(project, viewer):
    with pytest.raises(NotAllowed):
        api(project, user=viewer)


def test_ensemble_members_rules(project):
    a, b = api(project, "a"), api(project, "b")
    with pytest.raises(InvalidInput, match=r"^members: an ensemble needs at least two member teachers$"):
        teacher_create(project=project, name="ens", provider="ensemble", members=[a])
    with pytest.raises(InvalidInput, match=r"^members: only an ensemble teacher has members$"):
        api(project, "c", members=[a, b])
    with pytest.raises(InvalidInput, match=r"^teacher: no teacher named 'zzz' in project "):
        teacher_create(project=project, name="ens", provider="ensemble", members=["a", "zzz"])
    ens = teacher_create(project=project, name="ens", provider="ensemble", members=["a", b])
    assert sorted(ens.members.values_list("name", flat=True)) == ["a", "b"]
    with pytest.raises(InvalidInput, match=r"^members: an ensemble cannot contain another ensemble$"):
        teacher_create(project=project, name="ens2", provider="ensemble", members=[ens, a])


def test_members_from_another_project_refused(project, team, owner):
    from projects.services.projects import project_create

    other = project_create(team=team, user=owner, name="Other", task_type="generation")
    foreign = api(other, "x")
    a = api(project, "a")
    with pytest.raises(InvalidInput, match=r"^teacher 'x' belongs to another project$"):
        teacher_create(project=project, name="ens", provider="ensemble", members=[a, foreign])


# --- teacher_update ------------------------------------------------------------------------------

def test_teacher_update_changes_only_given_fields(project, member):
    t = api(project, temperature=0.3, max_tokens=100)
    teacher_update(teacher=t, user=member, temperature=0.0, name=" gpt-greedy ")
    t.refresh_from_db()
    assert (t.name, t.temperature, t.max_tokens, t.model) == ("gpt-greedy", 0.0, 100, "gpt-4o-mini")


def test_teacher_update_refusals_leave_row_unchanged(project, viewer):
    t = api(project)
    api(project, "other")
    with pytest.raises(InvalidInput, match=r"^provider: not a teacher setting that can be changed$"):
        teacher_update(teacher=t, provider="transformers")
    with pytest.raises(InvalidInput, match=r"^max_tokens: 0 is outside 1-131072$"):
        teacher_update(teacher=t, max_tokens=0)
    with pytest.raises(InvalidInput, match=r"^name: a teacher needs a name$"):
        teacher_update(teacher=t, name="")
    with pytest.raises(InvalidInput, match=r"already has a teacher named 'other'"):
        teacher_update(teacher=t, name="other")
    with pytest.raises(NotAllowed):
        teacher_update(teacher=t, temperature=1.0, user=viewer)
    t.refresh_from_db()
    assert (t.name, t.max_tokens, t.temperature) == ("gpt", 256, 0.3)


def test_teacher_update_ensemble_members(project):
    a, b, c = api(project, "a"), api(project, "b"), api(project, "c")
    ens = teacher_create(project=project, name="ens", provider="ensemble", members=[a, b])
    teacher_update(teacher=ens, members=["b", "c"])
    assert sorted(ens.members.values_list("name", flat=True)) == ["b", "c"]
    with pytest.raises(InvalidInput, match=r"^members: an ensemble needs at least two member teachers$"):
        teacher_update(teacher=ens, members=["a"])
    assert sorted(Teacher.objects.get(pk=ens.pk).members.values_list("name", flat=True)) == ["b", "c"]


# --- generation_start ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"split": "dev"}, r"^split: 'dev' is not one of train, validation, test, golden$"),
    ({"limit": 0}, rf"^limit: 0 is outside 1-{MAX_LIMIT}$"),
    ({"limit": MAX_LIMIT + 1}, rf"^limit: {MAX_LIMIT + 1} is outside 1-{MAX_LIMIT}$"),
    ({"samples_per_query": 21}, r"^samples_per_query: 21 is outside 1-20$"),
    ({"concurrency": 0}, r"^concurrency: 0 is outside 1-512$"),
    ({"budget_usd": 0}, r"^budget_usd: must be more than 0, got 0$"),
    ({"budget_usd": "NaN"}, r"^budget_usd: 'NaN' is not a finite number$"),
    ({"chunk_size": 10001}, r"^chunk_size: 10001 is outside 1-10000$"),
    ({"teachers": ["nobody"]}, r"^teacher: no teacher named 'nobody' in project "),
])
def test_generation_start_argument_checks(project, kw, message):
    api(project)
    add_queries(project, 3)
    with pytest.raises(InvalidInput, match=message):
        generation_start(project=project, **kw)
    assert not GenerationRun.objects.filter(project=project).exists()


def test_generation_start_needs_a_teacher_and_queries(project):
    add_queries(project, 2)
    with pytest.raises(InvalidState, match=r"has no teacher: add one"):
        generation_start(project=project)
    api(project)
    with pytest.raises(InvalidState, match=r"has no test queries: import queries first"):
        generation_start(project=project, split="test")


def test_generation_start_classification_needs_labels(project):
    api(project)
    add_queries(project, 2)
    project.labels = []
    project.save(update_fields=["labels"])
    with pytest.raises(InvalidState, match=r"is a classification project without labels"):
        generation_start(project=project)


def test_generation_start_viewer_refused(project, viewer):
    api(project)
    add_queries(project, 2)
    with pytest.raises(NotAllowed):
        generation_start(project=project, user=viewer)


def test_generation_start_creates_run_and_job(project, owner):
    a, b = api(project, "a"), api(project, "b")
    judge = api(project, "judge")
    ens = teacher_create(project=project, name="ens", provider="ensemble", members=[a, b])
    solo = api(project, "solo")
    project.checks = {"judge_teacher": "judge"}
    project.save(update_fields=["checks"])
    add_queries(project, 5)
    add_queries(project, 2, split="test")
    add_queries(project, 1, split="train", golden=True)
    run = generation_start(project=project, user=owner, limit=3, samples_per_query=2, budget_usd="1.5")
    assert run.reused is False
    # default teachers: not the ensemble's members, not the judge
    assert sorted(run.teachers.values_list("name", flat=True)) == ["ens", "solo"]
    assert judge.pk not in run.teachers.values_list("id", flat=True)
    assert run.options == {"split": "train", "queue": DEFAULT_QUEUE, "chunk_size": DEFAULT_CHUNK_SIZE, "queries": 3}
    assert (run.samples_per_query, run.concurrency, run.limit, run.budget_usd) == (2, 16, 3, Decimal("1.5"))
    assert run.created_by == owner
    assert run.job is not None and run.job.kind == "generation" and run.job.payload == {"run_id": run.pk}
    assert run.status == "queued"
    golden = generation_start(project=project, teachers=[solo, "ens"], split="golden", chunk_size=7, queue="gpu")
    assert golden.options == {"split": "golden", "queue": "gpu", "chunk_size": 7, "queries": 1}
    assert golden.created_by is None
    assert sorted(golden.teachers.values_list("name", flat=True)) == ["ens", "solo"]
    assert ens.pk in golden.teachers.values_list("id", flat=True)


def test_generation_start_double_submit_reuses_the_queued_run(project):
    api(project)
    add_queries(project, 4)
    first = generation_start(project=project, limit=2)
    again = generation_start(project=project, limit=2)
    assert again.pk == first.pk and again.reused is True
    other = generation_start(project=project, limit=3)
    assert other.pk != first.pk and other.reused is False
