"""Serving, the worker floor: the periodic step (``serving_tick``, run by
``workers.tasks.serving_tick_task`` on Celery beat) that drives the loop back from production
through the request-side services in ``projects.services.serving_loop``."""
from __future__ import annotations

import logging

from projects.models import Deployment, JobStatus, ModelArtifact
from projects.services import InvalidInput, InvalidState
from projects.services.serving_loop import deployment_harvest, deployment_retrain

log = logging.getLogger(__name__)


def serving_tick(*, now=None) -> dict:
    """The periodic step (Celery beat, every minute): for each active deployment, harvest new
    teacher answers, promote when the rule holds and ``auto_promote`` is on, retrain after
    ``retrain_every`` new production samples, and propose a finished retrain's student as the
    candidate (queuing an evaluation of it). Returns ``{slug: [actions]}``."""
    from projects.selectors_serving import deployment_live_figures
    from projects.services.deployments import deployment_promote
    from projects.services.evaluation import evaluation_start

    out: dict[str, list[str]] = {}
    for dep in Deployment.objects.filter(active=True).select_related("project", "project__team", "teacher",
                                                                     "student_artifact", "retrain_run"):
        acts: list[str] = []
        try:
            h = deployment_harvest(deployment=dep)
            if h["requests"]:
                acts.append(f"harvested {h['requests']} into run {h['run']}")
            live = deployment_live_figures(deployment=dep)
            if dep.auto_promote and live["promote"]["ready"]:
                deployment_promote(deployment=dep, note=f"auto: {live['promote']['reason']}")
                acts.append("promoted")
            dep.refresh_from_db()
            if dep.retrain_every and dep.harvested_since_retrain >= dep.retrain_every:
                try:
                    run = deployment_retrain(deployment=dep)
                    acts.append(f"retrain run {run.pk}")
                except InvalidState as exc:
                    acts.append(str(exc))
            rr = dep.retrain_run
            if rr is not None and rr.status == JobStatus.SUCCEEDED and dep.candidate_artifact_id is None:
                kind = dep.student_artifact.kind if dep.student_artifact else None
                arts = list(ModelArtifact.objects.filter(training_run=rr))
                pick = next((a for a in arts if a.kind == kind), None) or next(
                    (a for a in arts if a.kind in ("classifier", "merged", "int8", "adapter")), None)
                if pick is not None and pick.pk != dep.student_artifact_id:
                    Deployment.objects.filter(pk=dep.pk).update(candidate_artifact=pick)
                    try:  # the candidate stands even when no evaluation can start (e.g. no test split)
                        ev = evaluation_start(project=dep.project)
                        acts.append(f"candidate artifact {pick.pk}; evaluation {ev.pk}")
                    except (InvalidState, InvalidInput) as exc:
                        acts.append(f"candidate artifact {pick.pk}; no evaluation: {exc}")
        except Exception as exc:  # noqa: BLE001 - one broken deployment must not stop the others
            log.exception("serving tick failed for %s", dep.slug)
            acts.append(f"error: {exc}")
        if acts:
            out[dep.slug] = acts
    return out
