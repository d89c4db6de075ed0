"""Teams, users and memberships."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from projects.models import Membership, Role, Team
from projects.services import InvalidInput


def team_create(*, name: str) -> Team:
    """Create a team named ``name``; its slug is derived from the name (cut to the slug
    column's 100 characters).

    Raises InvalidInput when the name is empty or a team with the same slug exists."""
    name = (name or "").strip()
    slug = slugify(name)[:Team._meta.get_field("slug").max_length].strip("-")
    if not slug:
        raise InvalidInput("team name: must contain at least one letter or digit")
    if len(name) > 200:
        raise InvalidInput(f"team name: at most 200 characters, got {len(name)}")
    try:
        with transaction.atomic():
            return Team.objects.create(name=name, slug=slug)
    except IntegrityError:
        raise InvalidInput(f"team name: a team with slug {slug!r} already exists") from None


def user_create(*, username: str, team: Team, role: str, password: str, email: str = "",
                update: bool = False) -> AbstractBaseUser:
    """Create a user and make them a ``role`` of ``team``. With ``update``, an existing user of
    that ``username`` is reused instead: their password is set to ``password`` and their role
    in ``team`` to ``role``.

    Raises InvalidInput for an unknown role, an empty username, a password under 8 characters,
    or a ``username`` that exists already without ``update`` (``distill user create --update``)."""
    if role not in Role.values:
        raise InvalidInput(f"role: {role!r} is not one of {', '.join(Role.values)}")
    username = (username or "").strip()
    if not username:
        raise InvalidInput("username: must not be empty")
    limit = get_user_model()._meta.get_field("username").max_length
    if len(username) > limit:
        raise InvalidInput(f"username: at most {limit} characters, got {len(username)}")
    if password is None or len(password) < 8:
        raise InvalidInput("password: must be at least 8 characters")
    User = get_user_model()
    with transaction.atomic():
        user, created = User.objects.get_or_create(username=username, defaults={"email": email})
        if not created and not update:
            raise InvalidInput(f"username: user {username!r} already exists; "
                               "pass --update to set their password and role")
        user.set_password(password)
        user.save()
        Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return user
