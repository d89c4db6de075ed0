"""Verbs: ``team create``, ``user create``, ``project create``, ``job``."""
from __future__ import annotations

import os

from projects.cli import CliError, finish_job
from projects.models import Job, Project, TaskType, Team
from projects.services import InvalidState
from projects.services.jobs import job_cancel
from projects.services.projects import (MAX_FEW_SHOT_BYTES, MAX_RUBRIC_CHARS, MAX_SCHEMA_BYTES,
                                        project_checks_update, project_create, project_parse_few_shot,
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

    p = project.add_parser("checks", help="show or change the quality checks a teacher answer must pass")
    p.add_argument("--project", required=True)
    p.add_argument("--min-length", type=int, help="minimum answer length in characters")
    p.add_argument("--max-length", type=int, help="maximum answer length in characters")
    p.add_argument("--min-confidence", type=float, help="minimum top-label probability (0-1), soft labels only")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--refusal-phrases-file", help="more refusal phrases, one per line (turns the refusal check on)")
    g.add_argument("--refusal-check", action="store_true", help="turn the refusal check on")
    g.add_argument("--no-refusal-check", action="store_true", help="turn the refusal check off")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--judge", help="LLM judge: a teacher of the project by name, or a model (bundled name, "
                   "Hugging Face id org/name, artifact:ID of this project)")
    g.add_argument("--no-judge", action="store_true", help="remove the LLM judge")
    p.add_argument("--judge-rubric-file", help="the judge's rubric (UTF-8 text)")
    p.add_argument("--judge-threshold", type=int, help="lowest judge score accepted (1-5)")
    p.set_defaults(handler=cmd_project_checks)

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


def cmd_project_checks(o: dict) -> dict:
    """``{project, checks}``: the effective settings after the change (defaults filled in);
    without options it only prints them."""
    project = get_project(o["project"])
    changes: dict = {}
    for opt, key in (("min_length", "min_length"), ("max_length", "max_length"), ("min_confidence", "min_confidence"),
                     ("judge", "judge"), ("judge_threshold", "judge_min_score")):
        if o.get(opt) is not None:
            changes[key] = o[opt]
    if o.get("refusal_phrases_file"):
        text = _read_file(o["refusal_phrases_file"], "--refusal-phrases-file", 256 * 1024)
        changes["refusal"] = True
        changes["refusal_phrases"] = [x.strip() for x in text.splitlines() if x.strip()]
    elif o.get("refusal_check"):
        changes["refusal"] = True
    elif o.get("no_refusal_check"):
        changes["refusal"] = False
    if o.get("no_judge"):
        changes["judge"] = None
    if o.get("judge_rubric_file"):
        changes["judge_rubric"] = _read_file(o["judge_rubric_file"], "--judge-rubric-file", MAX_RUBRIC_CHARS * 4)
    # The CLI names options, not keys: "min_length: ..." becomes "--min-length: ...".
    option_of = {"min_length": "--min-length", "max_length": "--max-length", "min_confidence": "--min-confidence",
                 "refusal_phrases": "--refusal-phrases-file", "judge": "--judge", "judge_rubric": "--judge-rubric-file",
                 "judge_min_score": "--judge-threshold"}
    from projects.services import InvalidInput

    try:
        checks = project_checks_update(project=project, changes=changes)
    except InvalidInput as exc:
        key, sep, rest = str(exc).partition(": ")
        raise CliError(f"{option_of[key]}: {rest}" if sep and key in option_of else str(exc)) from None
    return {"project": project.slug, "checks": checks}


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
