"""Reads used by views, the CLI and exports. Every read that takes an id goes through a
user's teams, so another team's objects answer 404."""
from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from projects.models import Job, Membership, Project, Team


def teams_for_user(user) -> QuerySet[Team]:
    """Teams the user belongs to (any role)."""
    if not user.is_authenticated:
        return Team.objects.none()
    return Team.objects.filter(memberships__user=user)


def projects_for_user(user) -> QuerySet[Project]:
    """Projects of the user's teams, newest first."""
    return Project.objects.filter(team__in=teams_for_user(user)).select_related("team")


def project_for_user(user, slug: str) -> Project:
    """The project with ``slug`` if one of the user's teams owns it; Http404 otherwise."""
    try:
        return projects_for_user(user).get(slug=slug)
    except Project.DoesNotExist:
        raise Http404("No such project") from None


def jobs_for_user(user) -> QuerySet[Job]:
    """Jobs of the user's teams, newest first."""
    return Job.objects.filter(team__in=teams_for_user(user)).select_related("project")


def job_for_user(user, job_id: int) -> Job:
    """The job with ``job_id`` if one of the user's teams owns it; Http404 otherwise."""
    try:
        return jobs_for_user(user).get(pk=job_id)
    except Job.DoesNotExist:
        raise Http404("No such job") from None


def membership_for(user, team: Team) -> Membership | None:
    """The user's membership of ``team``, or None."""
    if not user.is_authenticated:
        return None
    return Membership.objects.filter(team=team, user=user).first()


def user_can_write(user, team: Team) -> bool:
    """True for owners and members of ``team``; viewers and outsiders read at most."""
    m = membership_for(user, team)
    return bool(m and m.can_write)


def project_stages(project: Project) -> list[dict]:
    """The loop as a row of stages for the overview: each ``{"key", "title", "counts": [(label,
    value)], "url_name"}``. Counts come from cheap aggregate queries."""
    from django.db.models import Count, Q

    from projects.models import Evaluation, Query, Sample, TrainingRun

    q = Query.objects.filter(project=project).aggregate(
        total=Count("id"),
        train=Count("id", filter=Q(split="train")),
        test=Count("id", filter=Q(split="test")),
        golden=Count("id", filter=Q(golden=True)),
    )
    s = Sample.objects.filter(run__project=project).aggregate(
        accepted=Count("id", filter=Q(status="accepted")),
        rejected=Count("id", filter=Q(status="rejected")),
        to_review=Count("id", filter=Q(status="rejected", review_status__isnull=True)),
        reviewed=Count("id", filter=Q(review_status__isnull=False)),
    )
    runs = TrainingRun.objects.filter(project=project)
    latest_eval = Evaluation.objects.filter(project=project).first()
    return [
        {"key": "queries", "title": "Queries", "url_name": "queries_page",
         "counts": [("queries", q["total"]), ("train", q["train"]), ("test", q["test"]), ("golden", q["golden"])]},
        {"key": "generation", "title": "Teacher data", "url_name": "generation_page",
         "counts": [("accepted", s["accepted"]), ("rejected", s["rejected"])]},
        {"key": "review", "title": "Review", "url_name": "review_page",
         "counts": [("to review", s["to_review"]), ("reviewed", s["reviewed"])]},
        {"key": "training", "title": "Students", "url_name": "training_page",
         "counts": [("runs", runs.count()), ("succeeded", runs.filter(status="succeeded").count())]},
        {"key": "evaluation", "title": "Evaluation", "url_name": "evaluation_page",
         "counts": [("verdict", latest_eval.verdict if latest_eval and latest_eval.verdict else "—")]},
    ]


def curated_samples(project: Project):
    """The curated dataset: samples on train-split queries that a human accepted, or that the
    checks accepted and no human rejected. Ordered by id (stable for hashing and export)."""
    from django.db.models import Q

    from projects.models import Sample, Split

    return (
        Sample.objects.filter(run__project=project, query__split=Split.TRAIN, query__golden=False)
        .filter(Q(review_status="accepted") | Q(review_status__isnull=True, status="accepted"))
        .select_related("query", "teacher")
        .order_by("id")
    )


def curated_dataset_rows(project: Project):
    """Yield the curated dataset as plain dicts: ``{"sample_id", "query_id", "query", "answer",
    "label", "label_probs", "teacher"}``; ``answer`` is the human edit when there is one.
    Streams with an iterator, so 100,000 rows do not sit in memory."""
    for s in curated_samples(project).iterator(chunk_size=2000):
        label = s.parsed if isinstance(s.parsed, str) else None
        yield {"sample_id": s.id, "query_id": s.query_id, "query": s.query.text, "answer": s.final_response,
               "label": label, "label_probs": s.label_probs, "teacher": s.teacher.name}


def curated_dataset_sha256(project: Project) -> tuple[str, int]:
    """Content hash of the curated dataset (sha256 over the canonical JSON of each row's query,
    answer, label and soft labels, in id order) and its row count: training runs record it."""
    import hashlib
    import json

    h = hashlib.sha256()
    n = 0
    for row in curated_dataset_rows(project):
        h.update(json.dumps([row["query"], row["answer"], row["label"], row["label_probs"]],
                            ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
        n += 1
    return h.hexdigest(), n


# --- Training -------------------------------------------------------------------------------


def training_runs(project: Project):
    """The project's training runs, newest first, with their job."""
    from projects.models import TrainingRun

    return TrainingRun.objects.filter(project=project).select_related("job", "created_by")


def training_run_for_user(user, slug: str, run_id: int):
    """The training run ``run_id`` of project ``slug`` if one of the user's teams owns it;
    Http404 otherwise."""
    from projects.models import TrainingRun

    project = project_for_user(user, slug)
    try:
        return TrainingRun.objects.select_related("project", "project__team", "job").get(pk=run_id, project=project)
    except TrainingRun.DoesNotExist:
        raise Http404("No such training run") from None


def training_artifact_for_user(user, slug: str, artifact_id: int):
    """The model artifact ``artifact_id`` of project ``slug`` for a member of its team; Http404 otherwise."""
    from projects.models import ModelArtifact

    project = project_for_user(user, slug)
    try:
        return ModelArtifact.objects.select_related("training_run").get(pk=artifact_id, project=project)
    except ModelArtifact.DoesNotExist:
        raise Http404("No such artifact") from None


def training_metrics(run) -> list[dict]:
    """The run's curve points as plain dicts (``split``, ``step``, ``epoch``, ``loss``,
    ``learning_rate``, ``grad_norm``, ``fidelity``), ordered by step."""
    from projects.models import TrainingMetric

    return list(TrainingMetric.objects.filter(run=run).order_by("step", "split").values(
        "split", "step", "epoch", "loss", "learning_rate", "grad_norm", "fidelity"))
