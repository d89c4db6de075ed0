"""Creating and editing projects (the task definition).

The output JSON Schema and the few-shot examples come as text from the project form and from
``distill project create --schema-file/--few-shot-file``; both parse them with
``project_parse_schema`` / ``project_parse_few_shot``, and ``project_validate`` (called by
``project_create`` and ``project_update``) checks the parsed values, so the limits below live
here only."""
from __future__ import annotations

import json
import math

from django.db import IntegrityError, transaction
from django.utils.text import slugify

from projects.models import Project, TaskType, Team
from projects.services import InvalidInput
from projects.services.idempotency import idempotency_key_parse, team_lock
from projects.services.permissions import ensure_can_write
from workers.pipeline.json_limits import MAX_DEPTH, JSONTooDeep, check_depth, loads_bounded

#: Largest output JSON Schema, in bytes of its JSON text (UTF-8).
MAX_SCHEMA_BYTES = 64 * 1024
#: Largest set of few-shot examples, in bytes of their JSON text (UTF-8), all examples together.
MAX_FEW_SHOT_BYTES = 256 * 1024


def _check_size(field: str, n_bytes: int, limit: int) -> None:
    if n_bytes > limit:
        raise InvalidInput(f"{field}: {n_bytes / 1024:.1f} KB is over the limit of {limit // 1024} KB")


def project_parse_schema(*, text: str, field: str = "output_schema") -> dict | None:
    """Parse the text of an output JSON Schema: None when blank, else the schema object. The
    schema itself is checked by ``project_validate``. Raises InvalidInput starting with
    ``field``: text over ``MAX_SCHEMA_BYTES``, not JSON, nested deeper than ``MAX_DEPTH``
    levels, or not a JSON object."""
    text = (text or "").strip()
    if not text:
        return None
    _check_size(field, len(text.encode("utf-8")), MAX_SCHEMA_BYTES)
    try:
        value = loads_bounded(text)
    except JSONTooDeep:
        raise InvalidInput(f"{field}: nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{field}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: a JSON Schema must be a JSON object")
    return value


def project_parse_few_shot(*, text: str, field: str = "few_shot") -> list[dict]:
    """Parse few-shot examples, one JSON object ``{"query": ..., "answer": ...}`` per line
    (blank lines skipped), into ``[{"query": str, "answer": str}]``; an answer that is not a
    string is kept as its JSON text. Raises InvalidInput starting with ``field``: text over
    ``MAX_FEW_SHOT_BYTES``, or naming the line that is not JSON, nests deeper than
    ``MAX_DEPTH`` levels or lacks a key."""
    text = text or ""
    _check_size(field, len(text.encode("utf-8")), MAX_FEW_SHOT_BYTES)
    examples = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads_bounded(line)
        except JSONTooDeep:
            raise InvalidInput(f"{field}: line {i}: nested more than {MAX_DEPTH} levels deep") from None
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{field}: line {i}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or "query" not in row or "answer" not in row:
            raise InvalidInput(f'{field}: line {i}: needs the keys "query" and "answer"')
        answer = row["answer"] if isinstance(row["answer"], str) else json.dumps(row["answer"], ensure_ascii=False)
        query = row["query"] if isinstance(row["query"], str) else json.dumps(row["query"], ensure_ascii=False)
        examples.append({"query": query, "answer": answer})
    return examples


def _unique_slug(name: str) -> str:
    base = slugify(name)[:90]
    if not base:
        raise InvalidInput("name: must contain at least one letter or digit")
    slug, n = base, 2
    while Project.objects.filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


def project_validate(*, task_type: str, labels: list[str], output_schema: dict | None,
                     split_train: float, split_validation: float, split_test: float,
                     few_shot: list[dict] | None = None) -> None:
    """Check a task definition. Raises InvalidInput naming the field at fault: an unknown
    task type, a classification without at least two distinct labels, an extraction without a
    JSON Schema, a schema over ``MAX_SCHEMA_BYTES`` or ``MAX_DEPTH`` levels deep or that its
    meta-schema refuses (``jsonschema``: the draft its ``$schema`` names, else 2020-12),
    few-shot examples that are not ``{"query": str, "answer": str}`` or over
    ``MAX_FEW_SHOT_BYTES`` together, split fractions that are not finite, negative or do not
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
        _check_schema(output_schema)
    if few_shot:
        _check_few_shot(few_shot)
    fractions = {"split_train": split_train, "split_validation": split_validation, "split_test": split_test}
    for field, value in fractions.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or value > 1:
            raise InvalidInput(f"{field}: must be a fraction between 0 and 1, got {value!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise InvalidInput(f"split fractions: must sum to 1, got {sum(fractions.values()):.4f}")
    if split_train <= 0:
        raise InvalidInput("split_train: must be above 0 (nothing to train on otherwise)")


def _check_schema(schema) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise InvalidInput("output_schema: a JSON Schema must be a JSON object")
    try:
        check_depth(schema)
    except JSONTooDeep:
        raise InvalidInput(f"output_schema: nested more than {MAX_DEPTH} levels deep") from None
    try:
        size = len(json.dumps(schema, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"output_schema: not a JSON value: {exc}") from None
    _check_size("output_schema", size, MAX_SCHEMA_BYTES)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(f"output_schema: not a valid JSON Schema: {exc.message}") from None


def _check_few_shot(few_shot) -> None:
    if not isinstance(few_shot, list) or not all(
            isinstance(x, dict) and isinstance(x.get("query"), str) and isinstance(x.get("answer"), str) for x in few_shot):
        raise InvalidInput('few_shot: must be a list of {"query": text, "answer": text} examples')
    size = sum(len(x["query"].encode("utf-8")) + len(x["answer"].encode("utf-8")) for x in few_shot)
    _check_size("few_shot", size, MAX_FEW_SHOT_BYTES)


def _clean_definition(*, name: str, task_type: str, labels: list[str] | None, output_schema: dict | None,
                      splits: tuple[float, float, float], few_shot: list[dict] | None = None) -> tuple[str, list[str]]:
    """The stripped name and label list of a task definition, after ``project_validate``.
    Raises InvalidInput for an empty name or a bad definition."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput("name: must not be empty")
    if len(name) > 200:
        raise InvalidInput(f"name: at most 200 characters, got {len(name)}")
    labels = [l.strip() for l in (labels or []) if l and l.strip()]
    project_validate(task_type=task_type, labels=labels, output_schema=output_schema,
                     split_train=splits[0], split_validation=splits[1], split_test=splits[2], few_shot=few_shot)
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
                                     splits=(split_train, split_validation, split_test), few_shot=few_shot)
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
                                     splits=(split_train, split_validation, split_test), few_shot=few_shot)
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
