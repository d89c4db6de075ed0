"""Plain dataclasses the pipeline takes: the task definition and one query. Services build
them from Django rows (``projects.services.*``); the pipeline never sees a model instance."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """What the project asks. ``labels``: classification label set; ``output_schema``: JSON
    Schema dict for extraction; ``few_shot``: ``[{"query": str, "answer": str}]``; ``checks``:
    quality-check settings (see workers.pipeline.checks)."""

    task_type: str
    instructions: str = ""
    labels: tuple[str, ...] = ()
    output_schema: dict | None = None
    few_shot: tuple[dict, ...] = ()
    checks: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueryItem:
    """One query to answer: the database id and the text."""

    query_id: int
    text: str
