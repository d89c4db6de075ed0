"""What the gateway knows, held in memory: the valid keys (by sha256) and the active
deployments, reloaded from Postgres every ``GATEWAY_REFRESH_S`` seconds by a background task.
No request ever waits on the database; a revoked key or a changed share takes effect at the next
refresh. Built with the Django ORM (run in a thread)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property

from gateway.upstream import Upstream

log = logging.getLogger("gateway")
_REFUSED: dict[int, str] = {}  # deployment id -> the reason last logged (logged once, not every refresh)

OPENAI_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Route:
    """A deployment as the gateway serves it (see ``projects.models.Deployment``)."""

    id: int
    slug: str
    team_id: int
    version: int
    task: object  # workers.pipeline.specs.TaskSpec
    teacher: Upstream
    student: Upstream
    student_kind: str  # "classifier" or "causal"
    student_share: float
    shadow_share: float
    confidence_threshold: float | None
    created: int

    @cached_property
    def teacher_prefix(self) -> tuple[dict, ...]:
        """The teacher's messages before the query (system prompt, few-shot pairs), built once."""
        from workers.pipeline import prompts

        return tuple(prompts.teacher_messages(self.task, "")[:-1])

    @cached_property
    def student_prefix(self) -> str:
        """The text before the query in the student's one user turn (none for a classifier)."""
        from workers.pipeline import prompts

        return "" if self.student_kind == "classifier" else prompts.student_messages(self.task, "")[0]["content"]


@dataclass(frozen=True)
class Snapshot:
    keys: dict  # sha256 hex -> (key id, team id)
    routes: dict  # (team id, slug) -> Route: slugs are unique per team


class RouteRefused(Exception):
    """A deployment the gateway will not serve (the message says which setting and why)."""


def _url(url: str, field: str, policy) -> str:
    """``url`` when the operator's policy lets the gateway send requests there, checked with the
    host resolved now (DNS answers can change after the setting was saved). Raises RouteRefused."""
    from workers.pipeline.security import Refused, check_teacher_url

    try:
        return check_teacher_url(url, policy=policy, field=field, require_resolution=True)
    except Refused as exc:
        raise RouteRefused(str(exc)) from None


def _teacher_upstream(dep, policy) -> Upstream:
    from workers.pipeline.security import Refused, check_key_env

    t = dep.teacher
    if t.provider == "transformers":
        base, model, key = _url(dep.teacher_url, "teacher_url", policy), t.model or t.name, ""
    else:
        base, model = _url((t.base_url or OPENAI_URL).rstrip("/"), "base_url", policy), t.model
        try:
            env = check_key_env(t.api_key_env, policy=policy)
        except Refused as exc:
            raise RouteRefused(str(exc)) from None
        key = os.environ.get(env, "") if env else ""
    return Upstream(name=f"teacher {t.name}", base_url=base, model=model, api_key=key, temperature=t.temperature,
                    max_tokens=t.max_tokens, timeout_s=t.timeout_s, price_in_per_1m=float(t.price_in_per_1m),
                    price_out_per_1m=float(t.price_out_per_1m))


def student_timeout_s() -> float:
    """Seconds the gateway waits for a student's answer before falling back to the teacher:
    ``GATEWAY_STUDENT_TIMEOUT_S`` (default 60; raise it for a slow student, e.g. a causal LM
    served on CPU). Raises SystemExit naming the variable when it is not a positive number."""
    raw = os.environ.get("GATEWAY_STUDENT_TIMEOUT_S") or "60"
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise SystemExit(f"GATEWAY_STUDENT_TIMEOUT_S={raw!r} is not a positive number of seconds")
    return value


def _student_upstream(dep, policy) -> tuple[Upstream, str]:
    from projects.services import ServiceError
    from projects.services.security import artifact_folder

    art = dep.student_artifact
    kind = "classifier" if art is not None and art.kind == "classifier" else "causal"
    common = dict(name=f"student of {dep.slug}", price_in_per_1m=float(dep.student_price_in_per_1m),
                  price_out_per_1m=float(dep.student_price_out_per_1m), timeout_s=student_timeout_s())
    if dep.student_url:
        model = dep.student_model or (f"artifact-{art.pk}" if art is not None else "student")
        return Upstream(base_url=_url(dep.student_url, "student_url", policy), model=model, temperature=0.0,
                        want_logprobs=kind == "causal" and dep.confidence_threshold is not None, **common), kind
    try:
        folder = artifact_folder(artifact=art)
    except ServiceError as exc:
        raise RouteRefused(f"student_artifact: {exc}") from None
    return Upstream(artifact_path=folder, **common), kind


def load_snapshot() -> Snapshot:
    """Read keys and active deployments from Postgres (blocking; call it in a thread). A
    deployment whose URLs, key variable or artifact the operator's policy refuses now
    (``projects.services.security``) is left out, with the reason logged."""
    from django.db import close_old_connections

    from projects.models import Deployment, GatewayKey
    from projects.selectors import project_task_spec
    from projects.services.security import security_policy

    close_old_connections()
    keys = {h: (kid, tid) for kid, h, tid in
            GatewayKey.objects.filter(revoked_at__isnull=True).values_list("id", "key_hash", "team_id")}
    routes = {}
    policy = security_policy()
    for dep in (Deployment.objects.filter(active=True)
                .select_related("project", "teacher", "student_artifact")):
        try:
            student, kind = _student_upstream(dep, policy)
            teacher = _teacher_upstream(dep, policy)
        except RouteRefused as exc:
            if _REFUSED.get(dep.pk) != str(exc):
                log.warning("deployment %s (id %s) not served: %s", dep.slug, dep.pk, exc)
            _REFUSED[dep.pk] = str(exc)
            continue
        _REFUSED.pop(dep.pk, None)
        routes[(dep.project.team_id, dep.slug)] = Route(id=dep.pk, slug=dep.slug, team_id=dep.project.team_id, version=dep.version,
                                 task=project_task_spec(dep.project), teacher=teacher, student=student,
                                 student_kind=kind, student_share=dep.student_share, shadow_share=dep.shadow_share,
                                 confidence_threshold=dep.confidence_threshold,
                                 created=int(dep.created_at.timestamp()))
    return Snapshot(keys=keys, routes=routes)
