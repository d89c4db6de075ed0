"""Serving: deployments (a student behind the gateway, A/B-routed against a teacher), their
versioned audit trail, promotion and rollback, and the teams' gateway API keys.

The gateway process (``gateway/``) reads these rows into memory every few seconds; nothing here
runs per request."""
from __future__ import annotations

import hashlib
import math
import secrets
from decimal import Decimal, InvalidOperation

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from projects.models import Deployment, DeploymentVersion, GatewayKey, ModelArtifact, Project, Team, Teacher
from projects.services import InvalidInput, InvalidState
from projects.services.permissions import ensure_can_write
from projects.services.security import security_policy
from workers.pipeline.security import Refused, check_teacher_url

KEY_PREFIX = "dh-"
PREFIX_CHARS = 11  # "dh-" + 8 characters: enough to tell keys apart on a page, useless to an attacker

# Settings a version records and a rollback restores.
CONFIG_FIELDS = ("teacher_id", "teacher_url", "student_artifact_id", "student_url", "student_model", "student_share",
                 "confidence_threshold", "shadow_share", "active", "promote_delta", "promote_window", "auto_promote",
                 "alert_agreement", "alert_window", "retrain_every", "student_price_in_per_1m",
                 "student_price_out_per_1m")
EDITABLE = {f.removesuffix("_id") if f.endswith("_id") else f for f in CONFIG_FIELDS}
SERVABLE_IN_PROCESS = {"classifier"}
#: Artifact kinds a deployment's student can be; all but the classifier answer at their own
#: endpoint (``student_url``): ``distill serve-student``, vLLM, or llama.cpp for a ``gguf``.
ARTIFACT_KINDS = {"classifier", "merged", "int8", "adapter", "gguf"}


def key_hash(*, raw: str) -> str:
    """The sha256 (hex) under which a gateway key is stored and looked up."""
    return hashlib.sha256(raw.encode()).hexdigest()


def deployment_config(*, deployment: Deployment) -> dict:
    """The deployment's routing settings as plain JSON (what a version records)."""
    out = {}
    for f in CONFIG_FIELDS:
        v = getattr(deployment, f)
        out[f] = str(v) if isinstance(v, Decimal) else v
    return out


def _check_url(value: str, field: str) -> str:
    """The gateway POSTs to these URLs, so they pass the same policy as a teacher's base_url
    (``workers.pipeline.security.check_teacher_url``); the gateway checks again, resolving the
    host, whenever it loads the deployment."""
    value = (value or "").strip()
    if not value:
        return ""
    if len(value) > 500:
        raise InvalidInput(f"{field}: at most 500 characters")
    try:
        check_teacher_url(value, policy=security_policy(), field=field)
    except Refused as exc:
        raise InvalidInput(str(exc)) from None
    return value.rstrip("/")


#: Upper bound of the window and count settings (they count requests and samples).
MAX_COUNT = 10 ** 9
#: Prices are stored with max_digits=12, decimal_places=6.
MAX_PRICE = Decimal("999999")


def _float(value, field: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{field}: {str(value)[:50]!r} is not a number") from None
    if not math.isfinite(x):
        raise InvalidInput(f"{field}: {str(value)[:50]!r} is not a finite number")
    return x


def _fraction(value, field: str) -> float:
    x = _float(value, field)
    if not 0.0 <= x <= 1.0:
        raise InvalidInput(f"{field}: {x} must be between 0 and 1 (a fraction, e.g. 0.05 for 5 %)")
    return x


def _positive_int(value, field: str, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise InvalidInput(f"{field}: {value!r} is not a whole number")
    try:
        x = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{field}: {str(value)[:50]!r} is not a whole number") from None
    if not minimum <= x <= maximum:
        raise InvalidInput(f"{field}: {str(x)[:50]} must be from {minimum} to {maximum}")
    return x


def _price(value, field: str) -> Decimal:
    try:
        x = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"{field}: {str(value)[:50]!r} is not a number") from None
    if not x.is_finite():
        raise InvalidInput(f"{field}: {str(value)[:50]!r} is not a finite number")
    if not 0 <= x <= MAX_PRICE:
        raise InvalidInput(f"{field}: must be from 0 to {MAX_PRICE} (USD per 1M tokens)")
    return x


def _validate(dep: Deployment) -> None:
    """Check a deployment's settings together; raises InvalidInput naming the field."""
    project = dep.project
    if dep.teacher is None or dep.teacher.project_id != project.pk:
        raise InvalidInput("teacher: choose a teacher of this project")
    if dep.teacher.provider == Teacher.Provider.ENSEMBLE:
        raise InvalidInput(f"teacher: {dep.teacher.name!r} is an ensemble; the gateway needs one teacher to answer")
    if dep.teacher.provider == Teacher.Provider.TRANSFORMERS and not dep.teacher_url:
        raise InvalidInput(f"teacher_url: teacher {dep.teacher.name!r} is a local model; serve it with "
                           "`distill serve-student --teacher NAME` and give its URL")
    art = dep.student_artifact
    if art is not None:
        if art.project_id != project.pk:
            raise InvalidInput("student_artifact: choose an artifact of this project")
        if art.kind not in ARTIFACT_KINDS:
            raise InvalidInput(f"student_artifact: a {art.kind!r} artifact cannot answer; choose one of "
                               f"{', '.join(sorted(ARTIFACT_KINDS))}")
        if art.kind == "gguf" and not dep.student_url:
            raise InvalidInput(f"student_url: a gguf student is served by llama.cpp (`python -m llama_cpp.server "
                               f"--model <its file> --model_alias artifact-{art.pk}`); give its URL")
        if art.kind not in SERVABLE_IN_PROCESS and not dep.student_url:
            raise InvalidInput(f"student_url: a {art.kind} student is served by `distill serve-student --artifact "
                               f"{art.pk}` (or vLLM / llama.cpp); give its URL")
    elif not dep.student_url:
        raise InvalidInput("student: choose a student artifact or give the student_url of an OpenAI-compatible endpoint")
    if dep.student_url and not dep.student_model and art is None:
        raise InvalidInput("student_model: the model name the student endpoint serves (e.g. the vLLM model id)")
    ct = dep.confidence_threshold
    if ct is not None:
        if art is not None and art.kind == "classifier" and not 0.0 <= ct <= 1.0:
            raise InvalidInput("confidence_threshold: a classifier's confidence is its top-label probability, "
                               "between 0 and 1")
        if (art is None or art.kind != "classifier") and ct > 0:
            raise InvalidInput("confidence_threshold: a causal LM's confidence is its mean token log-probability, "
                               "at most 0 (e.g. -0.5)")


def _clean_fields(fields: dict, project: Project) -> dict:
    out = {}
    for k, v in fields.items():
        if k not in EDITABLE:
            raise InvalidInput(f"{k}: not a deployment setting")
        if k == "teacher":
            if not isinstance(v, Teacher):
                v = Teacher.objects.filter(project=project, name=v).first() if isinstance(v, str) else \
                    Teacher.objects.filter(project=project, pk=v).first()
                if v is None:
                    raise InvalidInput(f"teacher: no teacher {fields[k]!r} in this project")
        elif k == "student_artifact":
            if v in ("", None):
                v = None
            elif not isinstance(v, ModelArtifact):
                v = ModelArtifact.objects.filter(project=project, pk=v).first()
                if v is None:
                    raise InvalidInput(f"student_artifact: no artifact {fields[k]!r} in this project")
        elif k in ("student_url", "teacher_url"):
            v = _check_url(v, k)
        elif k == "student_model":
            v = (v or "").strip()
            if len(v) > 300:
                raise InvalidInput("student_model: at most 300 characters")
        elif k in ("student_share", "shadow_share", "promote_delta", "alert_agreement"):
            v = _fraction(v, k)
        elif k == "confidence_threshold":
            if v in ("", None):
                v = None
            else:
                v = _float(v, k)
        elif k in ("promote_window", "alert_window"):
            v = _positive_int(v, k)
        elif k == "retrain_every":
            v = _positive_int(v, k, minimum=0)
        elif k in ("active", "auto_promote"):
            v = bool(v)
        elif k.startswith("student_price"):
            v = _price(v, k)
        out[k] = v
    return out


def _record(dep: Deployment, action: str, user, note: str = "") -> DeploymentVersion:
    return DeploymentVersion.objects.create(deployment=dep, version=dep.version, action=action,
                                            config=deployment_config(deployment=dep), note=note[:300],
                                            user=user if getattr(user, "pk", None) else None)


def deployment_create(*, project: Project, name: str, teacher, user=None, **fields) -> Deployment:
    """Create a deployment of ``project`` named ``name`` (its slug, the OpenAI ``model`` the
    clients send, is derived from the name). ``teacher``: a Teacher of the project, its name or
    id. ``fields``: any of the settings in ``EDITABLE`` (see ``Deployment``). Writes version 1.

    Slugs are unique per team (the gateway looks them up among the key's team's deployments).
    Raises NotAllowed for viewers, InvalidInput naming the field for a bad value or a slug that
    the team already uses."""
    ensure_can_write(user=user, team=project.team)
    name = (name or "").strip()
    slug = slugify(name)
    if not slug:
        raise InvalidInput("name: must contain at least one letter or digit")
    clean = _clean_fields({"teacher": teacher, **fields}, project)
    dep = Deployment(project=project, team_id=project.team_id, name=name, slug=slug, created_by=user if getattr(user, "pk", None) else None,
                     **clean)
    _validate(dep)
    try:
        with transaction.atomic():
            dep.save()
            _record(dep, "create", user)
    except IntegrityError:
        raise InvalidInput(f"name: team {project.team.slug} already has a deployment with slug {slug!r} (the model "
                           "name its clients send); choose another name") from None
    return dep


def deployment_update(*, deployment: Deployment, user=None, action: str = "update", note: str = "",
                      **fields) -> Deployment:
    """Change settings of ``deployment`` (any of ``EDITABLE``) and record a new version with
    ``action``. A change that leaves every setting as it was records nothing. Raises NotAllowed,
    InvalidInput naming the field."""
    ensure_can_write(user=user, team=deployment.project.team)
    clean = _clean_fields(fields, deployment.project)
    with transaction.atomic():
        dep = Deployment.objects.select_for_update(of=("self",)).select_related("project", "teacher", "student_artifact").get(
            pk=deployment.pk)
        before = deployment_config(deployment=dep)
        for k, v in clean.items():
            setattr(dep, k, v)
        _validate(dep)
        if deployment_config(deployment=dep) == before:
            return dep
        dep.version += 1
        dep.save()
        _record(dep, action, user, note)
    deployment.refresh_from_db()
    return dep


def deployment_promote(*, deployment: Deployment, user=None, note: str = "") -> Deployment:
    """Send all traffic to the student (``student_share`` 1.0), keeping the teacher for
    fallback; a new version with action ``promote``. Raises InvalidState when already at 100 %."""
    if deployment.student_share >= 1.0:
        raise InvalidState(f"deployment {deployment.slug}: the student already takes all traffic")
    return deployment_update(deployment=deployment, user=user, action="promote", note=note or "student to 100 %",
                             student_share=1.0)


def deployment_rollback(*, deployment: Deployment, user=None, to_version: int | None = None) -> Deployment:
    """Restore the settings of ``to_version`` (default: the version before the current one) as
    a new version with action ``rollback``. Raises InvalidState when there is nothing to roll
    back to, InvalidInput for an unknown version."""
    ensure_can_write(user=user, team=deployment.project.team)
    if to_version is None:
        prev = deployment.versions.filter(version__lt=deployment.version).order_by("-version").first()
        if prev is None:
            raise InvalidState(f"deployment {deployment.slug}: version {deployment.version} is the first; nothing to roll back to")
    else:
        prev = deployment.versions.filter(version=to_version).first()
        if prev is None:
            raise InvalidInput(f"version: deployment {deployment.slug} has no version {to_version}")
    cfg = dict(prev.config)
    fields = {}
    for k, v in cfg.items():
        if k not in CONFIG_FIELDS:
            continue
        fields[k.removesuffix("_id") if k.endswith("_id") else k] = v
    if fields.get("teacher") is None:
        fields.pop("teacher", None)
    return deployment_update(deployment=deployment, user=user, action="rollback", note=f"to version {prev.version}",
                             **fields)


def gateway_key_create(*, team: Team, name: str, user=None) -> tuple[GatewayKey, str]:
    """A new API key for ``team``'s deployments. Returns ``(row, raw_key)``: the raw key is
    shown once and never stored (the row keeps its sha256 and its first characters). Raises
    NotAllowed, InvalidInput (empty name)."""
    ensure_can_write(user=user, team=team)
    name = (name or "").strip()
    if not name:
        raise InvalidInput("name: give the key a name (e.g. the service that uses it)")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = GatewayKey.objects.create(team=team, name=name[:100], prefix=raw[:PREFIX_CHARS], key_hash=key_hash(raw=raw),
                                    created_by=user if getattr(user, "pk", None) else None)
    return row, raw


def gateway_key_revoke(*, key: GatewayKey, user=None) -> GatewayKey:
    """Revoke ``key``; the gateway refuses it from its next refresh (a few seconds). Raises
    NotAllowed, InvalidState when already revoked."""
    ensure_can_write(user=user, team=key.team)
    n = GatewayKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    if not n:
        raise InvalidState(f"key {key.prefix}…: already revoked")
    key.refresh_from_db()
    return key
