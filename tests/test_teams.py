"""projects/services/teams.py: team_create slugs and refusals, user_create roles, passwords and
the duplicate-user rule (refused unless ``update``)."""
from __future__ import annotations

import pytest

from projects.models import Membership, Team
from projects.services import InvalidInput
from projects.services.teams import team_create, user_create

pytestmark = pytest.mark.django_db
PW = "correct-horse-42"


def test_team_slug_from_name():
    t = team_create(name="  Acme Support Team!  ")
    assert (t.name, t.slug) == ("Acme Support Team!", "acme-support-team")
    assert Team.objects.get(slug="acme-support-team").pk == t.pk


def test_team_same_slug_refused():
    team_create(name="Acme Support")
    with pytest.raises(InvalidInput, match=r"^team name: a team with slug 'acme-support' already exists$"):
        team_create(name="ACME  support")
    assert Team.objects.filter(slug="acme-support").count() == 1


@pytest.mark.parametrize("name", ["", "   ", "!!!", None])
def test_team_name_needs_a_letter_or_digit(name):
    with pytest.raises(InvalidInput, match=r"^team name: must contain at least one letter or digit$"):
        team_create(name=name)


def test_team_name_too_long():
    with pytest.raises(InvalidInput, match=r"^team name: at most 200 characters, got 201$"):
        team_create(name="a" * 201)
    # A name of 101-200 characters used to reach the 100-character slug column and fail with a
    # DataError (an HTTP 500); the slug is cut to the column instead.
    t = team_create(name="b" * 200)
    assert (t.name, t.slug) == ("b" * 200, "b" * 100)
    assert team_create(name="c" * 99 + " d").slug == "c" * 99  # no trailing dash after the cut
    with pytest.raises(InvalidInput, match=r"^team name: a team with slug 'b{100}' already exists$"):
        team_create(name="b" * 150)


@pytest.mark.parametrize("role", ["owner", "member", "viewer"])
def test_user_create_each_role(team, role):
    u = user_create(username=f"u-{role}", team=team, role=role, password=PW, email="u@example.com")
    assert u.check_password(PW) and u.email == "u@example.com"
    assert Membership.objects.get(team=team, user=u).role == role


def test_user_create_unknown_role(team):
    with pytest.raises(InvalidInput, match=r"^role: 'admin' is not one of owner, member, viewer$"):
        user_create(username="ann", team=team, role="admin", password=PW)


def test_user_create_username_and_password_checks(team, django_user_model):
    with pytest.raises(InvalidInput, match=r"^username: must not be empty$"):
        user_create(username="  ", team=team, role="member", password=PW)
    with pytest.raises(InvalidInput, match=r"^username: at most 150 characters, got 151$"):
        user_create(username="x" * 151, team=team, role="member", password=PW)
    with pytest.raises(InvalidInput, match=r"^password: must be at least 8 characters$"):
        user_create(username="ann", team=team, role="member", password="short")
    with pytest.raises(InvalidInput, match=r"^password: must be at least 8 characters$"):
        user_create(username="ann", team=team, role="member", password=None)
    assert not django_user_model.objects.filter(username="ann").exists()


def test_duplicate_user_refused_without_update(team):
    first = user_create(username="ann", team=team, role="viewer", password=PW)
    with pytest.raises(InvalidInput, match=r"^username: user 'ann' already exists; pass --update"):
        user_create(username=" ann ", team=team, role="owner", password="new-password-9")
    first.refresh_from_db()
    assert first.check_password(PW)  # untouched
    assert Membership.objects.get(team=team, user=first).role == "viewer"


def test_update_sets_password_and_role(team, other_team):
    first = user_create(username="ann", team=team, role="viewer", password=PW)
    again = user_create(username="ann", team=team, role="owner", password="new-password-9", update=True)
    assert again.pk == first.pk
    again.refresh_from_db()
    assert again.check_password("new-password-9") and not again.check_password(PW)
    assert list(Membership.objects.filter(user=again).values_list("team__slug", "role")) == [("acme-support", "owner")]
    user_create(username="ann", team=other_team, role="member", password="new-password-9", update=True)
    assert sorted(Membership.objects.filter(user=again).values_list("team__slug", "role")) == \
        [("acme-support", "owner"), ("rival-corp", "member")]


def test_update_creates_a_missing_user(team):
    u = user_create(username="new", team=team, role="member", password=PW, update=True)
    assert Membership.objects.get(user=u).role == "member"
