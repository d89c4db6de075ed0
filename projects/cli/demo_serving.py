"""The last step of ``make demo``: serve the demo project's classifier student behind the gateway
and send a few requests through it with the ``openai`` client."""
from __future__ import annotations

from collections.abc import Callable

from projects.models import Deployment, ModelArtifact, Project, Team
from projects.services import InvalidState

DEMO_DEPLOYMENT = "support-intents-demo"


def demo_project() -> Project | None:
    """The demo project (found by team and name, as ``distill demo`` finds it), or None."""
    from projects.cli.demo_loop import DEMO_PROJECT, DEMO_TEAM_SLUG

    team = Team.objects.filter(slug=DEMO_TEAM_SLUG).first()
    return Project.objects.filter(team=team, name=DEMO_PROJECT).order_by("created_at").first() if team else None


def demo_serve(*, gateway_url: str, teacher_url: str = "", report: Callable[[str], None] = print,
               wait_s: float = 5.0) -> dict:
    """Deploy the demo project's newest classifier student (student share 50 %, shadow 50 %,
    confidence threshold 0.5) against its teacher (``teacher_url``: where a local teacher is
    served), create a team key, and ask six questions through the gateway at ``gateway_url``
    (ends in ``/v1``). Returns ``{deployment, key_prefix, answers: [{query, answer, route}]}``.
    Raises InvalidState when the demo has not produced a classifier student yet."""
    import logging
    import time

    import openai

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one "HTTP Request: POST …" line per answer

    from projects.services.deployments import deployment_create, deployment_update, gateway_key_create

    project = demo_project()
    team = project.team if project is not None else None
    art = (ModelArtifact.objects.filter(project=project, kind="classifier").order_by("-id").first()
           if project else None)
    if art is None:
        raise InvalidState("demo-serve: run `distill demo` first (no classifier student in the demo project yet)")
    teacher = project.teachers.exclude(provider="ensemble").order_by("created_at").first()
    settings = dict(student_artifact=art, student_share=0.5, shadow_share=0.5, confidence_threshold=0.5,
                    teacher=teacher, teacher_url=teacher_url if teacher.provider == "transformers" else "")
    dep = Deployment.objects.filter(team=team, slug=DEMO_DEPLOYMENT).first()
    if dep is None:
        dep = deployment_create(project=project, name=DEMO_DEPLOYMENT, **settings)
    else:
        dep = deployment_update(deployment=dep, **settings)
    row, key = gateway_key_create(team=team, name="demo")
    report(f"Deployment {dep.slug} v{dep.version}: classifier student #{art.pk} on 50 % of traffic, teacher "
           f"{teacher.name} on the rest and as fallback under confidence 0.5; key {row.prefix}… created.")
    time.sleep(wait_s)  # the gateway reloads keys and deployments every few seconds
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=2, timeout=120)
    queries = ["My new card still hasn't arrived, it's been two weeks.", "Someone stole my wallet with my card in it.",
               "The refund from the shop is not on my account yet.", "When will my card be delivered?",
               "I think I lost my card at the station.", "Where is the money the merchant sent back?"]
    answers = []
    for i, q in enumerate(queries):
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
    return {"deployment": dep.slug, "key_prefix": row.prefix, "key": key, "answers": answers}
