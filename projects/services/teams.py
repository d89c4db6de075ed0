"""Teams, users and memberships."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from projects.models import Membership, Role, Team
from projects.services import InvalidInput


def team_create(*, name: str) -> Team:
    """Create a team named ``name``; its slug is derived from the name.

    Raises InvalidInput when the name is empty or a team with the same slug exists."""
    name = (name or "").strip()
    slug = slugify(name)
    if not slug:
        raise InvalidInput("team name: must contain at least one letter or digit")
    try:
        with transaction.atomic():
            return Team.objects.create(name=name, slug=slug)
    except IntegrityError:
        raise InvalidInput(f"team name: a team with slug {slug!r} already exists") from None


def user_create(*, username: str, team: Team, role: str, password: str, email: str = "") -> AbstractBaseUser:
    """Create a user (or reuse an existing one by ``username``) and make them a ``role`` of ``team``.

    Raises InvalidInput for an unknown role, an empty username or a password under 8 characters."""
    if role not in Role.values:
        raise InvalidInput(f"role: {role!r} is not one of {', '.join(Role.values)}")
    username = (username or "").strip()
    if not username:
        raise InvalidInput("username: must not be empty")
    if password is None or len(password) < 8:
        raise InvalidInput("password: must be at least 8 characters")
    User = get_user_model()
    with transaction.atomic():
        user, created = User.objects.get_or_create(username=username, defaults={"email": email})
        user.set_password(password)
        user.save()
        Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return user
