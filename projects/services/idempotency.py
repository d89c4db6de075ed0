"""Double submits: one object per submitted form, and one active run per identical start.

Two guards, both inside the start's transaction and after a row lock that serializes the starts
of one project (``start_lock``) or the project creations of one team (``team_lock``), so two
requests at the same moment cannot both miss and both create:

1. The idempotency key. Each render of a start form (Train, Evaluate, Generate, New project)
   carries a fresh uuid4 in a hidden ``idempotency_key`` field; the service stores it on the
   row it creates (unique per project for runs and evaluations, per team for projects), and a
   second POST with the same key gets the row the first one made. Keys are looked up only in
   the project or team the user posts to, so one team's keys neither match nor block
   another's, and a user learns nothing about keys outside their own teams.
2. An identical start (same project, same parameters) while an earlier one is still queued or
   running returns that earlier one. The CLI verbs (no key) get this guard too.

A row a start service returns carries ``reused``: True when it is an earlier row (the caller
says "already queued" rather than "queued"), False when the call created it. It is a plain
attribute, not a column.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from django.db import models

from projects.models import JobStatus, Project, Team
from projects.services import InvalidInput

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)

M = TypeVar("M", bound=models.Model)


def idempotency_key_parse(*, key) -> uuid.UUID | None:
    """``key`` (a UUID, its text, None or "") as a UUID, or None when absent. Raises
    InvalidInput naming ``idempotency_key`` for text that is not a UUID."""
    if key is None or key == "":
        return None
    if isinstance(key, uuid.UUID):
        return key
    try:
        return uuid.UUID(str(key))
    except ValueError:
        raise InvalidInput(f"idempotency_key: {str(key)[:60]!r} is not a UUID; reload the page and submit again") from None


def start_lock(*, project: Project) -> None:
    """Lock ``project``'s row until the current transaction ends (``FOR NO KEY UPDATE``: other
    starts of the project wait; rows that only reference the project do not). Call inside
    ``transaction.atomic()`` before looking for an earlier start."""
    list(Project.objects.select_for_update(no_key=True).filter(pk=project.pk).values_list("pk", flat=True))


def team_lock(*, team: Team) -> None:
    """Lock ``team``'s row until the current transaction ends, like ``start_lock``."""
    list(Team.objects.select_for_update(no_key=True).filter(pk=team.pk).values_list("pk", flat=True))


def start_find_earlier(*, model: type[M], project: Project, key: uuid.UUID | None,
                       same: Callable[[M], bool]) -> M | None:
    """The earlier start that a new one should return, or None: the ``model`` row (a
    TrainingRun, Evaluation or GenerationRun) of ``project`` created with idempotency key
    ``key``, else the oldest row whose job is still queued or running and for which
    ``same(row)`` says its parameters equal the new start's. Locks the project first (see
    ``start_lock``), so call it inside the transaction that creates the new row."""
    start_lock(project=project)
    if key is not None:
        found = model.objects.filter(project=project, idempotency_key=key).first()
        if found is not None:
            return found
    for row in model.objects.filter(project=project, job__status__in=ACTIVE).order_by("id"):
        if same(row):
            return row
    return None
