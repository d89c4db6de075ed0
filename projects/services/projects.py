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


# --- Quality checks ---------------------------------------------------------------------------

#: Bounds of the quality-check settings (see ``workers.pipeline.checks`` for what each one does).
MAX_ANSWER_CHARS = 1_000_000
MAX_REFUSAL_PHRASES = 200
MAX_REFUSAL_PHRASE_CHARS = 200
MAX_RUBRIC_CHARS = 8000
#: The keys ``project_checks_update`` manages; any other key in ``Project.checks`` is kept.
CHECK_KEYS = ("min_length", "max_length", "min_confidence", "refusal", "refusal_phrases", "judge", "judge_rubric",
              "judge_min_score")


def _int_setting(field: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise InvalidInput(f"{field}: must be a whole number, got {value!r}")
    if not lo <= int(value) <= hi:
        raise InvalidInput(f"{field}: must be between {lo} and {hi}, got {int(value)}")
    return int(value)


def project_checks_judge(*, project: Project, judge: str) -> dict:
    """Where the LLM judge comes from: ``{"judge_teacher": name}`` when ``judge`` names a
    teacher of ``project`` (a teacher's name wins over a model of the same name), else
    ``{"judge_model": ref}`` for a model reference the worker loads as a local judge, checked
    by ``security.model_ref_check`` (a bundled name, a Hugging Face id, ``artifact:<id>`` of a
    ``merged`` artifact of THIS project, or a folder under ``DISTILLHUB_MODEL_DIRS``);
    ``{}`` for blank. Raises InvalidInput naming ``judge``."""
    from projects.models import Teacher
    from projects.services.security import model_ref_check

    judge = (judge or "").strip()
    if not judge:
        return {}
    if len(judge) > 300:
        raise InvalidInput(f"judge: at most 300 characters, got {len(judge)}")
    if Teacher.objects.filter(project=project, name=judge).exists():
        return {"judge_teacher": judge}
    return {"judge_model": model_ref_check(project=project, ref=judge, field="judge", kinds=("merged",))}


def project_checks_validate(*, project: Project, changes: dict) -> dict:
    """Check new quality-check settings and return ``Project.checks`` as it will be stored:
    the current checks with ``changes`` applied. ``changes`` maps keys of ``CHECK_KEYS`` to
    values; a value of None resets that setting to its default (``judge`` None or blank
    removes the judge). ``judge`` is a teacher name or a model reference (see
    ``project_checks_judge``), stored as ``judge_teacher`` or ``judge_model``.

    Bounds: ``min_length`` 0 to ``MAX_ANSWER_CHARS`` characters, ``max_length`` 1 to
    ``MAX_ANSWER_CHARS`` and not under ``min_length``, ``min_confidence`` a probability in
    [0, 1], ``refusal`` a bool, ``refusal_phrases`` at most ``MAX_REFUSAL_PHRASES`` non-blank
    strings of at most ``MAX_REFUSAL_PHRASE_CHARS`` characters, ``judge_rubric`` at most
    ``MAX_RUBRIC_CHARS`` characters, ``judge_min_score`` a whole number 1-5. Raises
    InvalidInput naming the setting at fault (an unknown key too)."""
    unknown = sorted(set(changes) - set(CHECK_KEYS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: not a quality-check setting (one of {', '.join(CHECK_KEYS)})")
    out = dict(project.checks or {})

    def put(key: str, value) -> None:
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value

    for key, value in changes.items():
        if key in ("min_length", "max_length"):
            put(key, None if value is None else _int_setting(key, value, 0 if key == "min_length" else 1, MAX_ANSWER_CHARS))
        elif key == "min_confidence":
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or not 0 <= value <= 1:
                    raise InvalidInput(f"min_confidence: must be a probability between 0 and 1, got {value!r}")
                value = float(value)
            put(key, value)
        elif key == "refusal":
            if value is not None and not isinstance(value, bool):
                raise InvalidInput(f"refusal: must be true or false, got {value!r}")
            put(key, value)
        elif key == "refusal_phrases":
            if value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                    raise InvalidInput("refusal_phrases: must be a list of phrases")
                value = list(dict.fromkeys(p.strip() for p in value if p.strip()))
                if len(value) > MAX_REFUSAL_PHRASES:
                    raise InvalidInput(f"refusal_phrases: at most {MAX_REFUSAL_PHRASES} phrases, got {len(value)}")
                for i, p in enumerate(value, 1):
                    if len(p) > MAX_REFUSAL_PHRASE_CHARS:
                        raise InvalidInput(f"refusal_phrases: phrase {i} is {len(p)} characters, over the limit of "
                                           f"{MAX_REFUSAL_PHRASE_CHARS}")
            put(key, value or None)
        elif key == "judge":
            out.pop("judge_teacher", None)
            out.pop("judge_model", None)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"judge: must be a teacher name or a model name, got {value!r}")
            out.update(project_checks_judge(project=project, judge=value or ""))
        elif key == "judge_rubric":
            if value is not None:
                if not isinstance(value, str):
                    raise InvalidInput("judge_rubric: must be text")
                value = value.strip()
                if len(value) > MAX_RUBRIC_CHARS:
                    raise InvalidInput(f"judge_rubric: {len(value)} characters, over the limit of {MAX_RUBRIC_CHARS}")
            put(key, value or None)
        elif key == "judge_min_score":
            put(key, None if value is None else _int_setting(key, value, 1, 5))
    lo, hi = int(out.get("min_length", 1)), int(out.get("max_length", 4000))
    if hi < lo:
        raise InvalidInput(f"max_length: {hi} is under min_length {lo}")
    return out


def project_checks_update(*, project: Project, changes: dict, user=None) -> dict:
    """Change ``project``'s quality-check settings (see ``project_checks_validate`` for the keys,
    their bounds and None as "default"); the next generation run's workers read them. Returns
    the effective settings, defaults filled in (``workers.pipeline.checks.effective_checks``).
    Raises NotAllowed for viewers, InvalidInput naming the setting at fault (nothing is saved)."""
    from workers.pipeline.checks import effective_checks

    ensure_can_write(user=user, team=project.team)
    from django.db import transaction
    from django.utils import timezone

    with transaction.atomic():
        # The changes apply to the stored settings (locked), not to ``project``'s copy, which a
        # concurrent save may have made stale.
        project.checks = Project.objects.select_for_update().values_list("checks", flat=True).get(pk=project.pk)
        checks = project_checks_validate(project=project, changes=changes)
        Project.objects.filter(pk=project.pk).update(checks=checks, updated_at=timezone.now())
    project.checks = checks
    return effective_checks(checks, project.task_type)
