"""Role checks that every write service calls first."""
from __future__ import annotations

from projects.models import Team
from projects.selectors import user_can_write
from projects.services import NotAllowed


def ensure_can_write(*, user, team: Team) -> None:
    """Raise NotAllowed unless ``user`` is an owner or member of ``team``.

    ``user=None`` means a trusted caller (the CLI run by an operator, a worker) and passes."""
    if user is None:
        return
    if not user_can_write(user, team):
        raise NotAllowed("Your role in this team is read-only (viewer); ask an owner for member access.")
