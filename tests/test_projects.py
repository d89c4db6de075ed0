"""The task definition's bounds (projects/services/projects.py): the output JSON Schema and the
few-shot examples, from the project form, the service and ``distill project create``."""
from __future__ import annotations

import json

import pytest
from django.urls import reverse

from projects.models import Project
from projects.services import InvalidInput
from projects.services.projects import project_create
from tests.test_cli import distill


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
