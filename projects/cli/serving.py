"""Verbs: ``deploy create|update|promote|rollback|show|harvest``, ``gateway-key create|revoke``,
``gateway`` (run the gateway) and ``serve-student`` (serve an artifact or a local teacher)."""
from __future__ import annotations

from projects.cli import CliError
from projects.cli.foundation import get_project, get_team
from projects.models import Deployment, GatewayKey

SETTING_OPTIONS = {
    # option dest -> service field
    "teacher": "teacher", "teacher_url": "teacher_url", "artifact": "student_artifact",
    "student_url": "student_url", "student_model": "student_model", "share": "student_share",
    "confidence_threshold": "confidence_threshold", "shadow_share": "shadow_share",
    "promote_delta": "promote_delta", "promote_window": "promote_window", "alert_agreement": "alert_agreement",
    "alert_window": "alert_window", "retrain_every": "retrain_every",
}


def _settings_args(p, *, create: bool) -> None:
    p.add_argument("--teacher", required=create, help="teacher name (any teacher of the project)")
    p.add_argument("--teacher-url", help="URL where a local (transformers) teacher is served")
    p.add_argument("--artifact", type=int, help="student artifact id (classifier, merged, int8, adapter, gguf)")
    p.add_argument("--student-url", help="OpenAI-compatible endpoint serving the student (serve-student, vLLM, llama.cpp, Ollama)")
    p.add_argument("--student-model", help="model name at --student-url")
    p.add_argument("--share", type=float, help="fraction of traffic to the student (default 0.05)")
    p.add_argument("--confidence-threshold", type=float,
                   help="classifier: top-label probability; causal LM: mean token log-probability")
    p.add_argument("--shadow-share", type=float, help="fraction of student answers also sent to the teacher")
    p.add_argument("--promote-delta", type=float, help="largest live quality delta for promotion (default 0.05)")
    p.add_argument("--promote-window", type=int, help="shadow comparisons the promote rule looks at")
    p.add_argument("--alert-agreement", type=float, help="divergence alert under this agreement (default 0.9)")
    p.add_argument("--alert-window", type=int, help="shadow comparisons the alert looks at")
    p.add_argument("--retrain-every", type=int, help="retrain after this many new production samples (0: off)")
    p.add_argument("--auto-promote", choices=["on", "off"], help="promote by itself when the rule holds")
    p.add_argument("--active", choices=["on", "off"])


def register(sub) -> None:
    dep = sub.add_parser("deploy", help="deployments behind the gateway").add_subparsers(dest="action", required=True)
    p = dep.add_parser("create", help="deploy a student against a teacher")
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True, help="its slug is the `model` clients send")
    _settings_args(p, create=True)
    p.set_defaults(handler=cmd_deploy_create)
    p = dep.add_parser("update", help="change a deployment's settings (a new version)")
    p.add_argument("deployment", help="deployment slug (TEAM_SLUG/SLUG where several teams use it)")
    _settings_args(p, create=False)
    p.set_defaults(handler=cmd_deploy_update)
    p = dep.add_parser("promote", help="send 100 %% of traffic to the student")
    p.add_argument("deployment")
    p.set_defaults(handler=cmd_deploy_promote)
    p = dep.add_parser("rollback", help="restore the previous version's settings")
    p.add_argument("deployment")
    p.add_argument("--to-version", type=int)
    p.set_defaults(handler=cmd_deploy_rollback)
    p = dep.add_parser("show", help="settings and live figures")
    p.add_argument("deployment")
    p.set_defaults(handler=cmd_deploy_show)
    p = dep.add_parser("harvest", help="turn logged teacher answers into a 'production traffic' generation run")
    p.add_argument("deployment")
    p.set_defaults(handler=cmd_deploy_harvest)

    key = sub.add_parser("gateway-key", help="gateway API keys").add_subparsers(dest="action", required=True)
    p = key.add_parser("create", help="a new key for a team (printed once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.set_defaults(handler=cmd_key_create)
    p = key.add_parser("revoke", help="revoke a key by its prefix")
    p.add_argument("--team", required=True)
    p.add_argument("prefix", help="the key's prefix as listed (e.g. dh-AbCdEfGh)")
    p.set_defaults(handler=cmd_key_revoke)

    p = sub.add_parser("gateway", help="run the OpenAI-compatible gateway (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(handler=cmd_gateway)

    p = sub.add_parser("demo-serve", help="serve the demo's classifier student behind a running gateway, send a few requests")
    p.add_argument("--gateway-url", default="http://127.0.0.1:8200/v1")
    p.add_argument("--teacher-url", default="", help="where a local demo teacher is served (serve-student --teacher)")
    p.set_defaults(handler=cmd_demo_serve)

    p = sub.add_parser("serve-student", help="serve a student artifact (or a local teacher) as an OpenAI-compatible endpoint")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--artifact", type=int, help="artifact id (classifier, merged, int8, adapter)")
    g.add_argument("--teacher", help="a local (transformers) teacher, as PROJECT_SLUG:NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.set_defaults(handler=cmd_serve_student)


def get_deployment(slug: str) -> Deployment:
    """The deployment ``slug``, or ``TEAM_SLUG/SLUG`` where several teams use the slug."""
    team, _, dep_slug = slug.rpartition("/")
    rows = Deployment.objects.select_related("project", "project__team", "teacher", "student_artifact").filter(
        slug=dep_slug)
    if team:
        rows = rows.filter(team__slug=team)
    rows = list(rows[:2])
    if not rows:
        raise CliError(f"deployment: no deployment with slug {slug!r}")
    if len(rows) > 1:
        raise CliError(f"deployment: several teams have a deployment {dep_slug!r}; give TEAM_SLUG/{dep_slug}")
    return rows[0]


def _fields(o: dict) -> dict:
    out = {SETTING_OPTIONS[k]: o[k] for k in SETTING_OPTIONS if o.get(k) is not None}
    for k in ("auto_promote", "active"):
        if o.get(k):
            out[k] = o[k] == "on"
    return out


def deployment_summary(dep: Deployment) -> dict:
    """``{deployment, project, version, teacher, student_artifact, student_url, student_share,
    confidence_threshold, shadow_share, active, live: {...}}``."""
    from projects.selectors_serving import deployment_live_figures

    dep.refresh_from_db()
    return {"deployment": dep.slug, "id": dep.pk, "project": dep.project.slug, "version": dep.version,
            "teacher": dep.teacher.name, "student_artifact": dep.student_artifact_id, "student_url": dep.student_url,
            "student_model": dep.student_model, "student_share": dep.student_share,
            "confidence_threshold": dep.confidence_threshold, "shadow_share": dep.shadow_share, "active": dep.active,
            "candidate_artifact": dep.candidate_artifact_id, "live": deployment_live_figures(deployment=dep)}


def cmd_deploy_create(o: dict) -> dict:
    from projects.services.deployments import deployment_create

    project = get_project(o["project"])
    fields = _fields(o)
    teacher = fields.pop("teacher")
    dep = deployment_create(project=project, name=o["name"], teacher=teacher, **fields)
    return deployment_summary(dep)


def cmd_deploy_update(o: dict) -> dict:
    from projects.services.deployments import deployment_update

    dep = deployment_update(deployment=get_deployment(o["deployment"]), **_fields(o))
    return deployment_summary(dep)


def cmd_deploy_promote(o: dict) -> dict:
    from projects.services.deployments import deployment_promote

    return deployment_summary(deployment_promote(deployment=get_deployment(o["deployment"])))


def cmd_deploy_rollback(o: dict) -> dict:
    from projects.services.deployments import deployment_rollback

    return deployment_summary(deployment_rollback(deployment=get_deployment(o["deployment"]), to_version=o.get("to_version")))


def cmd_deploy_show(o: dict) -> dict:
    return deployment_summary(get_deployment(o["deployment"]))


def cmd_deploy_harvest(o: dict) -> dict:
    from projects.services.serving_loop import deployment_harvest

    dep = get_deployment(o["deployment"])
    res = deployment_harvest(deployment=dep)
    return {"deployment": dep.slug, **res}


def cmd_key_create(o: dict) -> dict:
    from projects.services.deployments import gateway_key_create

    team = get_team(o["team"])
    row, raw = gateway_key_create(team=team, name=o["name"])
    return {"key": raw, "prefix": row.prefix, "id": row.pk, "team": team.slug,
            "_human": f"Key {row.prefix}… for team {team.slug} (shown once; store it now):\n{raw}"}


def cmd_key_revoke(o: dict) -> dict:
    from projects.services.deployments import gateway_key_revoke

    team = get_team(o["team"])
    rows = list(GatewayKey.objects.filter(team=team, prefix=o["prefix"]))
    if not rows:
        raise CliError(f"gateway-key revoke: team {team.slug} has no key with prefix {o['prefix']!r}")
    key = gateway_key_revoke(key=rows[0])
    return {"prefix": key.prefix, "id": key.pk, "revoked_at": key.revoked_at.isoformat()}


def cmd_gateway(o: dict) -> None:
    import uvicorn

    # uvloop and httptools: a cheaper event loop and HTTP parser (the gateway is CPU-bound under load).
    uvicorn.run("gateway.app:app", host=o["host"], port=o["port"], workers=o["workers"], log_level="warning",
                access_log=False, loop="uvloop", http="httptools")


def cmd_serve_student(o: dict) -> None:
    from gateway.student import run_server, serve_target

    target = serve_target(artifact_id=o.get("artifact"), teacher=o.get("teacher"))
    run_server(target, host=o["host"], port=o["port"])


def cmd_demo_serve(o: dict) -> dict:
    from projects.cli.demo_serving import demo_serve

    res = demo_serve(gateway_url=o["gateway_url"], teacher_url=o["teacher_url"])
    res["_human"] = (f"Try it: curl -s {o['gateway_url']}/chat/completions -H 'Authorization: Bearer {res['key']}' "
                     f"-H 'Content-Type: application/json' -d '{{\"model\": \"{res['deployment']}\", "
                     f"\"messages\": [{{\"role\": \"user\", \"content\": \"Where is my card?\"}}]}}'")
    return res
