"""workers/pipeline/specs.py: the plain dataclasses the pipeline takes instead of model rows."""
from __future__ import annotations

import dataclasses

import pytest

from workers.pipeline.specs import QueryItem, TaskSpec


def test_taskspec_defaults():
    t = TaskSpec(task_type="summarization")
    assert (t.task_type, t.instructions, t.labels, t.output_schema, t.few_shot, t.checks) == \
        ("summarization", "", (), None, (), {})


def test_taskspec_is_frozen():
    t = TaskSpec(task_type="classification", labels=("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.labels = ("c",)


def test_taskspec_checks_default_not_shared():
    a, b = TaskSpec(task_type="generation"), TaskSpec(task_type="generation")
    a.checks["min_length"] = 10  # the dict itself is mutable; each spec has its own
    assert b.checks == {}


def test_taskspec_equality_by_value():
    assert TaskSpec(task_type="classification", labels=("x",)) == TaskSpec(task_type="classification", labels=("x",))
    assert TaskSpec(task_type="classification", labels=("x",)) != TaskSpec(task_type="classification", labels=("y",))


def test_queryitem():
    q = QueryItem(query_id=7, text="where is my card?")
    assert (q.query_id, q.text) == (7, "where is my card?")
    assert q == QueryItem(7, "where is my card?")
    assert hash(q) == hash(QueryItem(7, "where is my card?"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.text = "other"


@pytest.mark.django_db
def test_project_row_becomes_taskspec(project):
    """The services build a TaskSpec from the project row (projects.selectors.project_task_spec):
    lists become tuples, so the spec stays hashable-by-value and immutable."""
    from projects.selectors import project_task_spec

    spec = project_task_spec(project)
    assert spec == TaskSpec(task_type="classification",
                            instructions="Classify the customer's message into one intent.",
                            labels=("card_arrival", "lost_or_stolen_card", "refund_not_showing_up"),
                            output_schema=None, few_shot=(), checks=dict(project.checks or {}))
    assert isinstance(spec.labels, tuple) and isinstance(spec.few_shot, tuple)
