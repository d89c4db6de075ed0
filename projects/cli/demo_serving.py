"""The last step of ``make demo``: serve the demo project's classifier student behind the gateway
and send a few requests through it with the ``openai`` client."""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable

from projects.models import Deployment, ModelArtifact, Project, Split, Team
from projects.services import InvalidState

DEMO_DEPLOYMENT = "support-intents-demo"
#: The threshold when the project has no validation queries to derive one from.
DEFAULT_THRESHOLD = 0.5
#: At most this many validation queries are classified to pick the threshold.
THRESHOLD_QUERIES = 200
DEMO_QUERIES = ["My new card still hasn't arrived, it's been two weeks.", "Someone stole my wallet with my card in it.",
                "The refund from the shop is not on my account yet.", "When will my card be delivered?",
                "I think I lost my card at the station.", "Where is the money the merchant sent back?",
                "Why did my top-up fail?", "I want to change my PIN.",
                "Please cancel the transfer I just made.", "I'd like to close my account."]


def demo_project() -> Project | None:
    """The demo project (found by team and name, as ``distill demo`` finds it), or None."""
    from projects.cli.demo_loop import DEMO_PROJECT, DEMO_TEAM_SLUG

    team = Team.objects.filter(slug=DEMO_TEAM_SLUG).first()
    return Project.objects.filter(team=team, name=DEMO_PROJECT).order_by("created_at").first() if team else None


def demo_threshold(*, project: Project, artifact: ModelArtifact, limit: int = THRESHOLD_QUERIES) -> tuple[float, int]:
    """A confidence threshold for the demo's classifier student: the median top-label
    probability it gives the project's validation queries (at most ``limit``), so about half of
    its in-distribution answers stand and half fall back to the teacher, and the demo shows both
    routes. (The product default, none or 0.5, suits a well-trained student; the demo's student,
    trained on a few hundred samples over 8 labels, is rarely that sure.) Returns ``(threshold,
    number of queries it was derived from)``; ``(DEFAULT_THRESHOLD, 0)`` without validation
    queries. Rounded down to 3 decimals."""
    import math

    from gateway.upstream import classify_text
    from projects.services.security import artifact_folder

    texts = list(project.queries.filter(split=Split.VALIDATION, golden=False).order_by("id")
                 .values_list("text", flat=True)[:limit])
    if not texts:
        return DEFAULT_THRESHOLD, 0
    path = artifact_folder(artifact=artifact)
    med = statistics.median(classify_text(path, t).confidence for t in texts)
    return math.floor(med * 1000) / 1000, len(texts)


def demo_serve(*, gateway_url: str, teacher_url: str = "", report: Callable[[str], None] = print,
               wait_s: float = 120.0) -> dict:
    """Deploy the demo project's newest classifier student (student share 50 %, shadow 50 %,
    confidence threshold from ``demo_threshold``) against its teacher (``teacher_url``: where a
    local teacher is served), create a team key, ask the ``DEMO_QUERIES`` through the gateway at
    ``gateway_url`` (ends in ``/v1``), then add the logged teacher answers to the project's data
    (``deployment_harvest``) and print the route counts. Returns ``{deployment, key_prefix, key,
    threshold, answers: [{query, answer, route}], routes: {route: n}, harvest: {runs, requests,
    accepted, rejected}}``. Before the first request it waits (up to ``wait_s`` seconds) until the
    gateway serves the new key and this version of the deployment (its ``/healthz``; it reloads
    them every few seconds), and after the last one until the request logs are written. Raises
    InvalidState when the demo has not produced a classifier student yet, or the gateway does
    not serve the deployment in time."""
    import logging

    import openai

    # Not one "HTTP Request: POST …" line per answer (the openai client logs through httpx2).
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from projects.services.deployments import deployment_create, deployment_update, gateway_key_create

    project = demo_project()
    team = project.team if project is not None else None
    art = (ModelArtifact.objects.filter(project=project, kind="classifier").order_by("-id").first()
           if project else None)
    if art is None:
        raise InvalidState("demo-serve: run `distill demo` first (no classifier student in the demo project yet)")
    teacher = project.teachers.exclude(provider="ensemble").order_by("created_at").first()
    threshold, n_val = demo_threshold(project=project, artifact=art)
    settings = dict(student_artifact=art, student_share=0.5, shadow_share=0.5, confidence_threshold=threshold,
                    teacher=teacher, teacher_url=teacher_url if teacher.provider == "transformers" else "")
    dep = Deployment.objects.filter(team=team, slug=DEMO_DEPLOYMENT).first()
    if dep is None:
        dep = deployment_create(project=project, name=DEMO_DEPLOYMENT, **settings)
    else:
        dep = deployment_update(deployment=dep, **settings)
    row, key = gateway_key_create(team=team, name="demo")
    how = (f"the median top-label probability over {n_val} validation queries" if n_val
           else "no validation queries to derive it from")
    report(f"Deployment {dep.slug} v{dep.version}: classifier student #{art.pk} on 50 % of traffic, teacher "
           f"{teacher.name} on the rest and as fallback under confidence {threshold:g} ({how}); "
           f"key {row.prefix}… created.")
    from gateway.readiness import GatewayNotReady, wait_served

    try:  # the gateway reloads keys and deployments every few seconds: wait until it has these
        wait_served(gateway_url, key, slug=dep.slug, version=dep.version, timeout_s=wait_s)
    except GatewayNotReady as exc:
        raise InvalidState(f"demo-serve: {exc}") from None
    # No retries: a retried request (after a timeout) would be answered and logged twice.
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0, timeout=300)
    from django.db.models import Max

    from projects.models import RequestLog

    since = RequestLog.objects.filter(deployment=dep).aggregate(m=Max("id"))["m"] or 0
    answers = []
    for i, q in enumerate(DEMO_QUERIES):
        try:
            raw = client.chat.completions.with_raw_response.create(model=dep.slug, user=f"demo-user-{i}",
                                                                   messages=[{"role": "user", "content": q}])
        except openai.APIError as exc:  # one line naming the request, not a traceback
            raise InvalidState(f"demo-serve: the gateway at {gateway_url} did not answer {q!r}: "
                               f"{str(exc).splitlines()[0][:300]}") from None
        resp = raw.parse()
        answers.append({"query": q, "answer": resp.choices[0].message.content,
                        "route": raw.headers.get("x-distillhub-route")})
        report(f"  [{answers[-1]['route']:>8}] {q} -> {answers[-1]['answer']}")
    routes = Counter(a["route"] for a in answers)
    harvest = _harvest(dep, n=len(answers), since=since, wait_s=wait_s)
    report(f"Routes: {routes['student']} answered by the student, {routes['fallback']} fell back to the teacher "
           f"(confidence under {threshold:g}), {routes['teacher']} routed to the teacher.")
    report(f"Harvested {harvest['requests']} logged teacher answers as production-traffic samples: "
           f"{harvest['accepted']} accepted, {harvest['rejected']} rejected (to the review queue).")
    return {"deployment": dep.slug, "key_prefix": row.prefix, "key": key, "threshold": threshold, "answers": answers,
            "routes": dict(routes), "harvest": harvest}


def _harvest(dep: Deployment, *, n: int, since: int, wait_s: float) -> dict:
    """Wait (up to ``wait_s``) until the gateway has written the ``n`` answered requests after
    request-log id ``since`` (it flushes every second), harvest the logged teacher answers, and
    sum up every production-traffic run that took requests after ``since`` (Celery beat's
    ``serving-tick`` may have harvested some of them first). Returns ``{runs, requests,
    accepted, rejected}``."""
    import time

    from projects.models import GenerationRun, RequestLog
    from projects.services.serving_loop import SOURCE, deployment_harvest

    deadline = time.time() + wait_s
    while (RequestLog.objects.filter(deployment=dep, id__gt=since).exclude(route="shadow").count() < n
           and time.time() < deadline):
        time.sleep(0.2)
    deployment_harvest(deployment=dep)
    runs = list(GenerationRun.objects.filter(project=dep.project, options__source=SOURCE,
                                             options__deployment=dep.slug, options__last_request__gt=since)
                .order_by("id").values("id", "accepted", "rejected"))
    acc, rej = sum(r["accepted"] for r in runs), sum(r["rejected"] for r in runs)
    return {"runs": [r["id"] for r in runs], "requests": acc + rej, "accepted": acc, "rejected": rej}
