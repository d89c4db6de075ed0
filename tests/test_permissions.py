"""projects/services/permissions.py: ensure_can_write for each role, outsiders and trusted callers."""
from __future__ import annotations

import pytest

from projects.services import NotAllowed
from projects.services.permissions import ensure_can_write

pytestmark = pytest.mark.django_db


def test_owner_and_member_may_write(team, owner, member):
    assert ensure_can_write(user=owner, team=team) is None
    assert ensure_can_write(user=member, team=team) is None


def test_viewer_refused_with_reason(team, viewer):
    with pytest.raises(NotAllowed) as exc:
        ensure_can_write(user=viewer, team=team)
    assert str(exc.value) == "Your role in this team is read-only (viewer); ask an owner for member access."


def test_outsider_refused_even_as_owner_of_another_team(team, other_team, outsider):
    ensure_can_write(user=outsider, team=other_team)  # owner of their own team
    with pytest.raises(NotAllowed):
        ensure_can_write(user=outsider, team=team)


def test_trusted_caller_passes(team):
    assert ensure_can_write(user=None, team=team) is None


def test_role_change_takes_effect(team, viewer):
    from projects.services.teams import user_create

    user_create(username="vera", team=team, role="member", password="another-pass-1", update=True)
    ensure_can_write(user=viewer, team=team)
    user_create(username="vera", team=team, role="viewer", password="another-pass-1", update=True)
    with pytest.raises(NotAllowed):
        ensure_can_write(user=viewer, team=team)


def test_user_without_membership_or_anonymous(team, django_user_model):
    from django.contrib.auth.models import AnonymousUser

    loner = django_user_model.objects.create_user(username="lonely", password="x" * 10)
    with pytest.raises(NotAllowed):
        ensure_can_write(user=loner, team=team)
    with pytest.raises(NotAllowed):
        ensure_can_write(user=AnonymousUser(), team=team)
