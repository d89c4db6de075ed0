"""Creating and editing projects (the task definition)."""
from __future__ import annotations

from django.db import IntegrityError, transaction
from django.utils.text import slugify

from projects.models import Project, TaskType, Team
from projects.services import InvalidInput
from projects.services.idempotency import idempotency_key_parse, team_lock
from projects.services.permissions import ensure_can_write


def _unique_slug(name: str) -> str:
    base = slugify(name)[:90]
    if not base:
        raise InvalidInput("name: must contain at least one letter or digit")
    slug, n = base, 2
    while Project.objects.filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


def project_validate(*, task_type: str, labels: list[str], output_schema: dict | None,
                     split_train: float, split_validation: float, split_test: float) -> None:
    """Check a task definition. Raises InvalidInput naming the field at fault: an unknown
    task type, a classification without at least two distinct labels, an extraction without a
    valid JSON Schema (checked with ``jsonschema``), split fractions that are negative or do not
    sum to 1."""
    if task_type not in TaskType.values:
        raise InvalidInput(f"task_type: {task_type!r} is not one of {', '.join(TaskType.values)}")
    if task_type == TaskType.CLASSIFICATION:
        cleaned = [l.strip() for l in labels if l and l.strip()]
        if len(set(x.casefold() for x in cleaned)) < 2:
            raise InvalidInput("labels: a classification project needs at least two distinct labels")
        if len(set(x.casefold() for x in cleaned)) != len(cleaned):
            raise InvalidInput("labels: labels must be distinct (case-insensitively)")
    if task_type == TaskType.EXTRACTION:
        if not isinstance(output_schema, dict):
            raise InvalidInput("output_schema: an extraction project needs a JSON Schema object")
    if output_schema is not None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(output_schema).check_schema(output_schema)
        except jsonschema.SchemaError as exc:
            raise InvalidInput(f"output_schema: not a valid JSON Schema: {exc.message}") from None
    fractions = {"split_train": split_train, "split_validation": split_validation, "split_test": split_test}
    for field, value in fractions.items():
        if value is None or value < 0 or value > 1:
            raise InvalidInput(f"{field}: must be a fraction between 0 and 1, got {value!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise InvalidInput(f"split fractions: must sum to 1, got {sum(fractions.values()):.4f}")
    if split_train <= 0:
        raise InvalidInput("split_train: must be above 0 (nothing to train on otherwise)")


def _clean_definition(*, name: str, task_type: str, labels: list[str] | None, output_schema: dict | None,
                      splits: tuple[float, float, float]) -> tuple[str, list[str]]:
    """The stripped name and label list of a task definition, after ``project_validate``.
    Raises InvalidInput for an empty name or a bad definition."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput("name: must not be empty")
    labels = [l.strip() for l in (labels or []) if l and l.strip()]
    project_validate(task_type=task_type, labels=labels, output_schema=output_schema,
                     split_train=splits[0], split_validation=splits[1], split_test=splits[2])
    return name, labels


def project_create(
    *,
    team: Team,
    name: str,
    task_type: str,
    user=None,
    instructions: str = "",
    labels: list[str] | None = None,
    output_schema: dict | None = None,
    few_shot: list[dict] | None = None,
    checks: dict | None = None,
    split_train: float = 0.8,
    split_validation: float = 0.1,
    split_test: float = 0.1,
    idempotency_key=None,
) -> Project:
    """Create a project in ``team``. ``idempotency_key`` (a UUID from the New project form):
    when ``team`` already has the project created with it, that project is returned (with
    ``reused`` True; see ``projects.services.idempotency``), so the form posted twice makes one.

    Raises NotAllowed for viewers, InvalidInput for a bad definition (see ``project_validate``)
    or a malformed key."""
    ensure_can_write(user=user, team=team)
    name, labels = _clean_definition(name=name, task_type=task_type, labels=labels, output_schema=output_schema,
                                     splits=(split_train, split_validation, split_test))
    key = idempotency_key_parse(key=idempotency_key)
    try:
        with transaction.atomic():
            if key is not None:
                team_lock(team=team)
                earlier = Project.objects.filter(team=team, idempotency_key=key).first()
                if earlier is not None:
                    earlier.reused = True
                    return earlier
            project = Project.objects.create(
                team=team, name=name, slug=_unique_slug(name), task_type=task_type,
                instructions=instructions or "", labels=labels, output_schema=output_schema,
                few_shot=few_shot or [], checks=checks or {},
                split_train=split_train, split_validation=split_validation, split_test=split_test,
                created_by=user, idempotency_key=key,
            )
            project.reused = False
            return project
    except IntegrityError:
        raise InvalidInput(f"name: a project with a slug like {slugify(name)!r} was created at the same moment; try again") from None


def project_update(
    *,
    project: Project,
    user=None,
    name: str,
    task_type: str,
    instructions: str = "",
    labels: list[str] | None = None,
    output_schema: dict | None = None,
    few_shot: list[dict] | None = None,
    checks: dict | None = None,
    split_train: float = 0.8,
    split_validation: float = 0.1,
    split_test: float = 0.1,
) -> Project:
    """Change a project's task definition (the slug stays). ``checks`` None keeps the current
    checks. Queries already imported keep their split; new imports use the new fractions.
    Raises NotAllowed for viewers, InvalidInput for a bad definition (see ``project_validate``)."""
    ensure_can_write(user=user, team=project.team)
    name, labels = _clean_definition(name=name, task_type=task_type, labels=labels, output_schema=output_schema,
                                     splits=(split_train, split_validation, split_test))
    project.name, project.task_type, project.instructions = name, task_type, instructions or ""
    project.labels, project.output_schema, project.few_shot = labels, output_schema, few_shot or []
    if checks is not None:
        project.checks = checks
    project.split_train, project.split_validation, project.split_test = split_train, split_validation, split_test
    # Only the definition: counters the workers keep on the row (search versions, audit mark)
    # are never written back from a stale copy.
    project.save(update_fields=["name", "task_type", "instructions", "labels", "output_schema", "few_shot", "checks",
                                "split_train", "split_validation", "split_test", "updated_at"])
    return project
