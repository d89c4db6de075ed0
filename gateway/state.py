"""What the gateway knows, held in memory: the valid keys (by sha256) and the active
deployments, reloaded from Postgres every ``GATEWAY_REFRESH_S`` seconds by a background task.
No request ever waits on the database; a revoked key or a changed share takes effect at the next
refresh. Built with the Django ORM (run in a thread)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.upstream import Upstream

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


@dataclass(frozen=True)
class Snapshot:
    keys: dict  # sha256 hex -> (key id, team id)
    routes: dict  # slug -> Route


def _teacher_upstream(dep) -> Upstream:
    t = dep.teacher
    if t.provider == "transformers":
        base, model, key = dep.teacher_url, t.model or t.name, ""
    else:
        base, model = (t.base_url or OPENAI_URL).rstrip("/"), t.model
        key = os.environ.get(t.api_key_env, "") if t.api_key_env else ""
    return Upstream(name=f"teacher {t.name}", base_url=base, model=model, api_key=key, temperature=t.temperature,
                    max_tokens=t.max_tokens, timeout_s=t.timeout_s, price_in_per_1m=float(t.price_in_per_1m),
                    price_out_per_1m=float(t.price_out_per_1m))


def _student_upstream(dep, media_root: Path) -> tuple[Upstream, str]:
    art = dep.student_artifact
    kind = "classifier" if art is not None and art.kind == "classifier" else "causal"
    common = dict(name=f"student of {dep.slug}", price_in_per_1m=float(dep.student_price_in_per_1m),
                  price_out_per_1m=float(dep.student_price_out_per_1m), timeout_s=60.0)
    if dep.student_url:
        model = dep.student_model or (f"artifact-{art.pk}" if art is not None else "student")
        return Upstream(base_url=dep.student_url, model=model, temperature=0.0,
                        want_logprobs=kind == "causal" and dep.confidence_threshold is not None, **common), kind
    return Upstream(artifact_path=str((media_root / art.path).resolve()), **common), kind


def load_snapshot() -> Snapshot:
    """Read keys and active deployments from Postgres (blocking; call it in a thread)."""
    from django.conf import settings
    from django.db import close_old_connections

    from projects.models import Deployment, GatewayKey
    from projects.selectors import project_task_spec

    close_old_connections()
    keys = {h: (kid, tid) for kid, h, tid in
            GatewayKey.objects.filter(revoked_at__isnull=True).values_list("id", "key_hash", "team_id")}
    routes = {}
    media = Path(settings.MEDIA_ROOT)
    for dep in (Deployment.objects.filter(active=True)
                .select_related("project", "teacher", "student_artifact")):
        student, kind = _student_upstream(dep, media)
        routes[dep.slug] = Route(id=dep.pk, slug=dep.slug, team_id=dep.project.team_id, version=dep.version,
                                 task=project_task_spec(dep.project), teacher=_teacher_upstream(dep), student=student,
                                 student_kind=kind, student_share=dep.student_share, shadow_share=dep.shadow_share,
                                 confidence_threshold=dep.confidence_threshold,
                                 created=int(dep.created_at.timestamp()))
    return Snapshot(keys=keys, routes=routes)
