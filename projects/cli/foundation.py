"""Verbs: ``team create``, ``user create``, ``project create``, ``job``."""
from __future__ import annotations

import os

from projects.cli import CliError, finish_job
from projects.models import Job, Project, TaskType, Team
from projects.services import InvalidState
from projects.services.jobs import job_cancel
from projects.services.projects import (MAX_FEW_SHOT_BYTES, MAX_SCHEMA_BYTES, project_create, project_parse_few_shot,
                                        project_parse_schema)
from projects.services.teams import team_create, user_create


def get_team(slug: str) -> Team:
    try:
        return Team.objects.get(slug=slug)
    except Team.DoesNotExist:
        raise CliError(f"--team: no team with slug {slug!r}") from None


def get_project(slug: str) -> Project:
    """The project with ``slug`` or CliError naming ``--project``."""
    try:
        return Project.objects.select_related("team").get(slug=slug)
    except Project.DoesNotExist:
        raise CliError(f"--project: no project with slug {slug!r}") from None


def _read_file(path: str, option: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path``; with ``max_bytes``, no more than that is read (a file that is
    longer, or endless like a device, is refused). Raises CliError naming ``option``."""
    try:
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise CliError(f"{option}: {path!r} is over the limit of {max_bytes // 1024} KB")
        return data.decode("utf-8")
    except OSError as exc:
        raise CliError(f"{option}: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{option}: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def register(sub) -> None:
    team = sub.add_parser("team", help="teams").add_subparsers(dest="action", required=True)
    p = team.add_parser("create", help="create a team")
    p.add_argument("name")
    p.set_defaults(handler=cmd_team_create)

    user = sub.add_parser("user", help="users").add_subparsers(dest="action", required=True)
    p = user.add_parser("create", help="create a user in a team")
    p.add_argument("name")
    p.add_argument("--team", required=True)
    p.add_argument("--role", choices=["owner", "member", "viewer"], default="member")
    p.add_argument("--password-env", required=True, help="environment variable that holds the password")
    p.add_argument("--email", default="")
    p.add_argument("--update", action="store_true",
                   help="the user may exist already: set their password and their role in the team")
    p.set_defaults(handler=cmd_user_create)

    project = sub.add_parser("project", help="projects").add_subparsers(dest="action", required=True)
    p = project.add_parser("create", help="create a project")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--task-type", required=True, choices=TaskType.values)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", help="comma-separated label set")
    g.add_argument("--labels-file", help="file with one label per line")
    p.add_argument("--schema-file", help="JSON Schema file (extraction)")
    p.add_argument("--instructions-file", help="teacher instructions (system prompt)")
    p.add_argument("--few-shot-file", help="JSONL of {query, answer} examples")
    p.set_defaults(handler=cmd_project_create)

    p = sub.add_parser("job", help="a job's state; --wait blocks until it ends; --cancel asks it to stop")
    p.add_argument("id", type=int)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--cancel", action="store_true")
    p.set_defaults(handler=cmd_job)


def cmd_team_create(o: dict) -> dict:
    team = team_create(name=o["name"])
    return {"team": team.slug, "id": team.pk}


def cmd_user_create(o: dict) -> dict:
    var = o["password_env"]
    password = os.environ.get(var)
    if not password:
        raise CliError(f"--password-env: environment variable {var} is not set or empty")
    team = get_team(o["team"])
    user = user_create(username=o["name"], team=team, role=o["role"], password=password, email=o["email"],
                       update=o["update"])
    return {"user": user.username, "team": team.slug, "role": o["role"]}


def cmd_project_create(o: dict) -> dict:
    team = get_team(o["team"])
    labels: list[str] = []
    if o.get("labels"):
        labels = [x.strip() for x in o["labels"].split(",") if x.strip()]
    elif o.get("labels_file"):
        labels = [x.strip() for x in _read_file(o["labels_file"], "--labels-file").splitlines() if x.strip()]
    schema = None
    if o.get("schema_file"):
        schema = project_parse_schema(text=_read_file(o["schema_file"], "--schema-file", MAX_SCHEMA_BYTES),
                                      field="--schema-file")
    instructions = _read_file(o["instructions_file"], "--instructions-file") if o.get("instructions_file") else ""
    few_shot = []
    if o.get("few_shot_file"):
        few_shot = project_parse_few_shot(text=_read_file(o["few_shot_file"], "--few-shot-file", MAX_FEW_SHOT_BYTES),
                                          field="--few-shot-file")
    project = project_create(team=team, name=o["name"], task_type=o["task_type"], labels=labels,
                             output_schema=schema, instructions=instructions, few_shot=few_shot)
    return {"project": project.slug, "id": project.pk, "task_type": project.task_type, "labels": project.labels}


def job_summary(job: Job) -> dict:
    return {"job": job.pk, "kind": job.kind, "status": job.status, "progress": round(job.progress, 4),
            "message": job.message, "error": job.error, "result": job.result}


def cmd_job(o: dict) -> dict:
    try:
        job = Job.objects.get(pk=o["id"])
    except Job.DoesNotExist:
        raise CliError(f"job: no job with id {o['id']}") from None
    if o["cancel"]:
        try:
            job = job_cancel(job=job)
        except InvalidState as exc:
            raise CliError(str(exc)) from None
    return finish_job(o, job.pk, lambda: job_summary(Job.objects.get(pk=job.pk)), f"job {job.pk}")
