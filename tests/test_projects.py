"""The task definition's bounds (projects/services/projects.py): the output JSON Schema and the
few-shot examples, from the project form, the service and ``distill project create``."""
from __future__ import annotations

import json

import pytest
from django.urls import reverse

from projects.models import Project
from projects.services import InvalidInput
from projects.services.projects import project_create
from tests.test_cli import distill, last_json


def nested_schema(levels: int) -> dict:
    """An object schema whose property ``a`` nests ``levels`` objects deep (2 JSON levels each)."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def settings_form(**over) -> dict:
    return {"name": "Support intents", "task_type": "extraction", "output_schema": '{"type": "object"}',
            "few_shot": "", "split_train": "0.8", "split_validation": "0.1", "split_test": "0.1", **over}


def field_errors(response, field: str) -> list[str]:
    return list(response.context["form"].errors.get(field, []))


@pytest.mark.django_db
def test_deeply_nested_schema_and_few_shot_are_form_errors_not_500(owner_client, project):
    url = reverse("project_settings", kwargs={"slug": project.slug})
    r = owner_client.post(url, settings_form(output_schema="[" * 5000))
    assert r.status_code == 200 and field_errors(r, "output_schema") == ["Nested more than 32 levels deep"]
    r = owner_client.post(url, settings_form(output_schema=json.dumps(nested_schema(20))))
    assert field_errors(r, "output_schema") == ["Nested more than 32 levels deep"]
    deep_line = '{"query": "q", "answer": ' + "[" * 3000 + "]" * 3000 + "}"
    r = owner_client.post(url, settings_form(few_shot='{"query": "q", "answer": "a"}\n' + deep_line))
    assert r.status_code == 200 and field_errors(r, "few_shot") == ["Line 2: nested more than 32 levels deep"]
    project.refresh_from_db()
    assert project.task_type == "classification"  # nothing saved
    # Within the bounds it saves, the answer kept as JSON text.
    r = owner_client.post(url, settings_form(output_schema=json.dumps(nested_schema(10)),
                                             few_shot='{"query": "q", "answer": {"a": [1]}}'))
    assert r.status_code == 302
    project.refresh_from_db()
    assert project.output_schema == nested_schema(10) and project.few_shot == [{"query": "q", "answer": '{"a": [1]}'}]


@pytest.mark.django_db
def test_schema_and_few_shot_sizes_are_bounded(owner_client, project):
    url = reverse("project_settings", kwargs={"slug": project.slug})
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 60} for i in range(1000)}}
    text = json.dumps(big)
    assert len(text) > 64 * 1024
    r = owner_client.post(url, settings_form(output_schema=text))
    assert r.status_code == 200
    (error,) = field_errors(r, "output_schema")
    assert error.endswith("KB is over the limit of 64 KB")
    few = "\n".join(json.dumps({"query": f"q{i}", "answer": "a" * 300}) for i in range(1000))
    assert len(few) > 256 * 1024
    r = owner_client.post(url, settings_form(few_shot=few))
    (error,) = field_errors(r, "few_shot")
    assert error.endswith("KB is over the limit of 256 KB")


@pytest.mark.django_db
def test_an_invalid_schema_is_refused_by_its_meta_schema(owner_client, project):
    url = reverse("project_settings", kwargs={"slug": project.slug})
    r = owner_client.post(url, settings_form(output_schema='{"type": "object", "properties": {"a": {"minLength": -1}}}'))
    assert r.status_code == 200
    (error,) = field_errors(r, "output_schema")
    assert error.startswith("not a valid JSON Schema: -1 is less than the minimum of 0")
    # The draft named by $schema is the one checked (draft 4: exclusiveMaximum is a boolean).
    r = owner_client.post(url, settings_form(output_schema=json.dumps(
        {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "exclusiveMaximum": 5})))
    (error,) = field_errors(r, "output_schema")
    assert error == "not a valid JSON Schema: 5 is not of type 'boolean'"


def test_the_parsers_name_the_field_they_are_given():
    from projects.services.projects import project_parse_few_shot, project_parse_schema

    with pytest.raises(InvalidInput, match=r"^--schema-file: nested more than 32 levels deep$"):
        project_parse_schema(text="[" * 60_000, field="--schema-file")
    with pytest.raises(InvalidInput, match=r"^--schema-file: a JSON Schema must be a JSON object$"):
        project_parse_schema(text="[1]", field="--schema-file")
    with pytest.raises(InvalidInput, match=r"^few_shot: line 3: not valid JSON: Expecting value$"):
        project_parse_few_shot(text='{"query": "a", "answer": "b"}\n\nnope')
    assert project_parse_schema(text="  ") is None
    assert project_parse_few_shot(text='{"query": 7, "answer": ["x"]}') == [{"query": "7", "answer": '["x"]'}]


@pytest.mark.django_db
def test_the_service_bounds_values_given_directly(team, owner):
    deep: dict = {}
    for _ in range(5000):  # past the recursion limit of jsonschema and json
        deep = {"not": deep}
    with pytest.raises(InvalidInput, match=r"^output_schema: nested more than 32 levels deep$"):
        project_create(team=team, user=owner, name="X", task_type="extraction", output_schema=deep)
    with pytest.raises(InvalidInput, match=r"^few_shot: must be a list of"):
        project_create(team=team, user=owner, name="X", task_type="generation", few_shot=[{"query": "q"}])
    with pytest.raises(InvalidInput, match=r"^split_train: must be a fraction between 0 and 1, got nan$"):
        project_create(team=team, user=owner, name="X", task_type="generation",
                       split_train=float("nan"), split_validation=0.5, split_test=0.5)
    assert not Project.objects.filter(name="X").exists()


@pytest.mark.django_db(transaction=True)
def test_cli_project_create_refuses_deep_or_large_files_with_one_line(tmp_path):
    assert distill("team", "create", "T1").returncode == 0
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 60_000)
    r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "extraction", "--schema-file", str(deep))
    assert (r.returncode, r.stderr) == (1, "error: --schema-file: nested more than 32 levels deep\n")
    deep_few = tmp_path / "few.jsonl"
    deep_few.write_text('{"query": "q", "answer": ' + "[" * 100_000 + "\n")
    r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "generation",
                "--few-shot-file", str(deep_few))
    assert (r.returncode, r.stderr) == (1, "error: --few-shot-file: line 1: nested more than 32 levels deep\n")
    big = tmp_path / "big.json"
    big.write_text('{"description": "' + "x" * 70_000 + '"}')
    for path in (big, "/dev/zero"):  # a device is never read to its (missing) end
        r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "extraction", "--schema-file", str(path))
        assert (r.returncode, r.stderr) == (1, f"error: --schema-file: {str(path)!r} is over the limit of 64 KB\n")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"description": "caf\xe9"}'.encode("latin-1"))
    r = distill("project", "create", "--team", "t1", "--name", "X", "--task-type", "extraction", "--schema-file", str(latin))
    assert r.returncode == 1 and r.stderr.startswith("error: --schema-file:") and "is not UTF-8 text" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    few = tmp_path / "ok.jsonl"
    few.write_text('{"query": "q", "answer": {"city": "Oslo"}}\n')
    r = distill("project", "create", "--team", "t1", "--name", "Y", "--task-type", "generation", "--few-shot-file", str(few))
    assert r.returncode == 0, r.stderr
    assert Project.objects.get(name="Y").few_shot == [{"query": "q", "answer": '{"city": "Oslo"}'}]


# --- Quality checks: Settings form, service, CLI, and what the next generation run does ----------


def checks_form(**over) -> dict:
    base = {"min_length": "1", "max_length": "4000", "min_confidence": "0.5", "refusal": "on", "refusal_phrases": "",
            "judge": "", "judge_rubric": "", "judge_min_score": "3"}
    base.update(over)
    return {f"checks-{k}": v for k, v in base.items() if v is not None}


def checks_errors(response) -> dict:
    return {k: list(v) for k, v in response.context["checks_form"].errors.items()}


@pytest.mark.django_db
def test_checks_form_errors_name_the_field_and_save_nothing(owner_client, project):
    url = reverse("project_checks", args=[project.slug])
    r = owner_client.post(url, checks_form(min_length="-1", min_confidence="1.5", judge_min_score="9"))
    assert r.status_code == 400
    errors = checks_errors(r)
    assert errors == {"min_length": ["Ensure this value is greater than or equal to 0."],
                      "min_confidence": ["Ensure this value is less than or equal to 1."],
                      "judge_min_score": ["Ensure this value is less than or equal to 5."]}
    r = owner_client.post(url, checks_form(min_length="50", max_length="10"))
    assert r.status_code == 400 and checks_errors(r) == {"max_length": ["Must be at least the minimum length (50)."]}
    # The judge goes through the model-name policy: a free path, another project's artifact.
    r = owner_client.post(url, checks_form(judge="/etc/passwd"))
    assert r.status_code == 400 and list(checks_errors(r)) == ["judge"]
    assert checks_errors(r)["judge"][0].startswith("judge: ")
    r = owner_client.post(url, checks_form(judge="artifact:999999"))
    assert checks_errors(r) == {"judge": ["judge: artifact 999999 is not an artifact of project support-intents; "
                                          "choose one of this project's own artifacts"]}
    r = owner_client.post(url, checks_form(refusal_phrases="x" * 201))
    assert checks_errors(r) == {"refusal_phrases": ["phrase 1 is 201 characters, over the limit of 200"]}
    project.refresh_from_db()
    assert project.checks == {}
    # The page shows the form with the defaults filled in.
    page = owner_client.get(reverse("project_settings", args=[project.slug]))
    assert page.context["checks_form"].initial["max_length"] == 4000
    assert b'name="checks-min_length"' in page.content


@pytest.mark.django_db
def test_checks_form_saves_and_viewer_gets_403(client, project, owner, member, viewer):
    from projects.services.generation import teacher_create

    teacher_create(project=project, name="grader", provider="openai", model="gpt-x", base_url="https://api.example.com/v1")
    url = reverse("project_checks", args=[project.slug])
    client.force_login(viewer)
    r = client.post(url, checks_form(min_length="7"))
    assert r.status_code == 403
    project.refresh_from_db()
    assert project.checks == {}
    client.force_login(member)
    r = client.post(url, checks_form(min_length="7", max_length="300", min_confidence="0.8", refusal=None,
                                     refusal_phrases="Computer says no\n\n  Not today  \n", judge="grader",
                                     judge_rubric="5 if polite", judge_min_score="4"))
    assert r.status_code == 302, checks_errors(r) if r.status_code == 400 else r.status_code
    project.refresh_from_db()
    assert project.checks == {"min_length": 7, "max_length": 300, "min_confidence": 0.8, "refusal": False,
                              "refusal_phrases": ["Computer says no", "Not today"], "judge_teacher": "grader",
                              "judge_rubric": "5 if polite", "judge_min_score": 4}
    # A model instead of a teacher: stored as judge_model; blank removes the judge.
    client.post(url, checks_form(judge="smollm2-135m-instruct"))
    project.refresh_from_db()
    assert project.checks["judge_model"] == "smollm2-135m-instruct" and "judge_teacher" not in project.checks
    client.post(url, checks_form(judge=""))
    project.refresh_from_db()
    assert "judge_model" not in project.checks and "judge_teacher" not in project.checks


@pytest.mark.django_db
def test_checks_service_validates_every_setting_and_keeps_other_keys(project, viewer):
    from projects.services import NotAllowed
    from projects.services.projects import project_checks_update

    project.checks = {"duplicate": True}
    project.save()
    for changes, message in [
        ({"min_length": 2.5}, "min_length: must be a whole number, got 2.5"),
        ({"min_length": float("inf")}, "min_length: must be a whole number, got inf"),
        ({"judge_min_score": float("nan")}, "judge_min_score: must be a whole number, got nan"),
        ({"max_length": 0}, "max_length: must be between 1 and 1000000, got 0"),
        ({"min_length": 10, "max_length": 5}, "max_length: 5 is under min_length 10"),
        ({"min_confidence": float("nan")}, "min_confidence: must be a probability between 0 and 1, got nan"),
        ({"refusal": "yes"}, "refusal: must be true or false, got 'yes'"),
        ({"refusal_phrases": "no"}, "refusal_phrases: must be a list of phrases"),
        ({"judge_min_score": 0}, "judge_min_score: must be between 1 and 5, got 0"),
        ({"judge_rubric": "x" * 8001}, "judge_rubric: 8001 characters, over the limit of 8000"),
        ({"judge": "../models/x"}, None),
        ({"temperature": 1}, "temperature: not a quality-check setting"),
    ]:
        with pytest.raises(InvalidInput) as exc:
            project_checks_update(project=project, changes=changes)
        assert str(exc.value).startswith(message or changes and next(iter(changes)) + ": ")
    with pytest.raises(NotAllowed):
        project_checks_update(project=project, user=viewer, changes={"min_length": 3})
    effective = project_checks_update(project=project, changes={"min_length": 3, "judge_min_score": 5})
    assert Project.objects.get(pk=project.pk).checks == {"duplicate": True, "min_length": 3, "judge_min_score": 5}
    assert effective["min_length"] == 3 and effective["max_length"] == 4000 and effective["duplicate"] is True
    project_checks_update(project=project, changes={"min_length": None})
    assert Project.objects.get(pk=project.pk).checks == {"duplicate": True, "judge_min_score": 5}


@pytest.mark.django_db(transaction=True)
def test_cli_project_checks_round_trip(tmp_path):
    assert distill("team", "create", "T1").returncode == 0
    assert distill("project", "create", "--team", "t1", "--name", "Sum", "--task-type", "summarization").returncode == 0
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("Computer says no\nNot today\n")
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Score 5 if the summary keeps every number.\n")
    r = distill("project", "checks", "--project", "sum", "--min-length", "20", "--max-length", "500",
                "--refusal-phrases-file", str(phrases), "--judge", "smollm2-135m-instruct",
                "--judge-rubric-file", str(rubric), "--judge-threshold", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    assert out["project"] == "sum"
    assert out["checks"] == {"min_length": 20, "max_length": 500, "min_confidence": 0.5, "refusal": True,
                             "refusal_phrases": ["Computer says no", "Not today"], "duplicate": True,
                             "judge_teacher": None, "judge_model": "smollm2-135m-instruct",
                             "judge_rubric": "Score 5 if the summary keeps every number.", "judge_min_score": 4}
    # Without options it prints the same settings; options not given keep their values.
    assert last_json(distill("project", "checks", "--project", "sum", "--json")) == out
    r = distill("project", "checks", "--project", "sum", "--no-refusal-check", "--no-judge", "--json")
    assert r.returncode == 0, r.stderr
    changed = last_json(r)["checks"]
    assert changed["refusal"] is False and changed["judge_model"] is None and changed["min_length"] == 20
    assert Project.objects.get(slug="sum").checks["refusal_phrases"] == ["Computer says no", "Not today"]
    r = distill("project", "checks", "--project", "sum", "--min-confidence", "2")
    assert (r.returncode, r.stderr) == (1, "error: --min-confidence: must be a probability between 0 and 1, got 2.0\n")
    r = distill("project", "checks", "--project", "sum", "--max-length", "5")
    assert (r.returncode, r.stderr) == (1, "error: --max-length: 5 is under min_length 20\n")
    r = distill("project", "checks", "--project", "sum", "--judge", "/etc")
    assert r.returncode == 1 and r.stderr.startswith("error: --judge: ") and len(r.stderr.splitlines()) == 1
    r = distill("project", "checks", "--project", "sum", "--no-refusal-check", "--refusal-phrases-file", str(phrases))
    assert r.returncode == 2


def _answer(text: str) -> str:
    """The stub teacher: a short answer to ``short N``, a refusal to ``refuse N``, else a long one
    (every answer names its query, so the duplicate check never fires)."""
    if text.startswith("short"):
        return f"ok {text[-1]}"
    if text.startswith("refuse"):
        return f"Computer says no to {text}."
    return f"A full answer, long enough for any minimum: {text}."


@pytest.mark.timeout(180)
def test_settings_change_what_the_next_generation_run_accepts(celery_worker, client, team, owner):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_start, teacher_create
    from tests.conftest import wait_job
    from tests.generation_fixtures import add_queries
    from tests.openai_stub import StubServer

    stub = StubServer(answer=_answer).start()
    try:
        project = project_create(team=team, user=owner, name="Replies", task_type="generation")
        add_queries(project, [(q, None) for q in ("short 1", "short 2", "long 1", "long 2", "refuse 1")])
        teacher_create(project=project, name="api", provider="openai", model="gpt-stub", base_url=stub.base_url)

        def run_statuses() -> dict:
            run = generation_start(project=project, user=owner)
            job = wait_job(run.job.pk, timeout=120)
            assert job.status == "succeeded", (job.message, job.error)
            return {s.query.text: (s.status, s.failed_checks)
                    for s in Sample.objects.filter(run=GenerationRun.objects.get(pk=run.pk)).select_related("query")}

        assert {q: st for q, (st, _) in run_statuses().items()} == dict.fromkeys(
            ("short 1", "short 2", "long 1", "long 2", "refuse 1"), "accepted")

        client.force_login(owner)
        r = client.post(reverse("project_checks", args=[project.slug]),
                        checks_form(min_length="20", refusal_phrases="Computer says no"))
        assert r.status_code == 302
        assert run_statuses() == {"short 1": ("rejected", ["length"]), "short 2": ("rejected", ["length"]),
                                  "long 1": ("accepted", []), "long 2": ("accepted", []),
                                  "refuse 1": ("rejected", ["refusal"])}
    finally:
        stub.stop()


@pytest.mark.django_db
def test_checks_update_applies_its_changes_to_the_stored_settings_not_a_stale_copy(project):
    """Two saves from copies of the project loaded before either (two requests, or the page and
    the CLI): the second kept the first's change only if it re-read the row (it lost it)."""
    from projects.services.projects import project_checks_update

    first, second = Project.objects.get(pk=project.pk), Project.objects.get(pk=project.pk)
    project_checks_update(project=first, changes={"min_length": 3})
    project_checks_update(project=second, changes={"max_length": 300})
    assert Project.objects.get(pk=project.pk).checks == {"min_length": 3, "max_length": 300}
    assert second.checks == {"min_length": 3, "max_length": 300}
