"""Quality checks for teacher answers: rejection sampling keeps only answers that pass them all.

Each check is a small pure function ``check_x(answer, task, settings) -> CheckResult | None``
(None: the check does not apply to this task). ``run_checks`` runs them in order and returns a
``Verdict``. Settings come from ``TaskSpec.checks`` (the project's ``checks`` dict):

- ``min_length`` (characters, default 1) and ``max_length`` (default 4000)
- ``refusal`` (bool, default true): reject answers that open with a refusal phrase: one of the
  built-in ones (``REFUSAL_PATTERNS``) or one of ``refusal_phrases`` (list of strings, default
  none; compared case-insensitively after leading whitespace)
- ``min_confidence`` (probability, default 0.5): for classification answers that carry label
  probabilities (soft labels), reject when the top label's probability is below it, so an
  uncertain teacher answer goes to human review instead of the dataset
- ``duplicate`` (bool, default true for summarization and generation): reject an answer that is
  word-for-word the same as another answer already seen in the run
- ``judge_teacher`` (a teacher of the project, by name) or ``judge_model`` (a model reference
  the worker loads as a local judge), ``judge_rubric`` (text), ``judge_min_score`` (1-5, default
  3): the optional LLM-judge check; its messages and score parsing live here, the call in
  generation.py

``effective_checks`` fills in these defaults, for pages and the CLI.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field

from workers.pipeline.json_limits import loads_bounded
from workers.pipeline.prompts import match_label
from workers.pipeline.specs import TaskSpec


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``name`` (e.g. ``truncated``), ``passed``, ``reason`` (human text)."""

    name: str
    passed: bool
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    """What the checks look at: the teacher's text (None when the provider returned no content),
    its finish reason and, for classification, the label probabilities if known."""

    text: str | None
    finish_reason: str = "stop"
    label_probs: dict[str, float] | None = None


@dataclass
class Verdict:
    """``accepted`` when every check passed; ``parsed`` is the label (classification) or the JSON
    object (extraction) or None; ``checks`` every result in order; ``failed`` the failed names."""

    accepted: bool
    parsed: object = None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


REFUSAL_PATTERNS = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i cannot|i can'?t|i can not|i won'?t|i am unable|i'?m unable|"
    r"as an ai\b|i'?m not able|i am not able|unfortunately,? i (?:cannot|can'?t))",
    flags=re.I,
)
UNICODE_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", flags=re.S)


def check_finish_reason(a: Answer, task: TaskSpec, s: dict) -> CheckResult | None:
    """``length`` -> ``truncated`` (the answer was cut off; never repaired into the dataset);
    ``content_filter`` -> rejected by the provider's filter."""
    if a.finish_reason == "length":
        return CheckResult("truncated", False, "the teacher hit its max tokens (finish_reason=length)")
    if a.finish_reason == "content_filter":
        return CheckResult("content_filter", False, "the provider's content filter withheld the answer")
    return CheckResult("finish_reason", True, a.finish_reason or "stop")


def check_non_empty(a: Answer, task: TaskSpec, s: dict) -> CheckResult:
    """The answer has some non-whitespace text."""
    if a.text is None or not a.text.strip():
        return CheckResult("non_empty", False, "the answer is empty" if a.text is not None else "no content returned")
    return CheckResult("non_empty", True)


def check_length(a: Answer, task: TaskSpec, s: dict) -> CheckResult:
    """Length in characters within [min_length, max_length]."""
    lo, hi = int(s.get("min_length", 1)), int(s.get("max_length", 4000))
    n = len((a.text or "").strip())
    if n < lo:
        return CheckResult("length", False, f"{n} characters, under the minimum of {lo}")
    if n > hi:
        return CheckResult("length", False, f"{n} characters, over the maximum of {hi}")
    return CheckResult("length", True, f"{n} characters")


def check_refusal(a: Answer, task: TaskSpec, s: dict) -> CheckResult | None:
    """The answer does not open with a refusal phrase: a built-in one ("I'm sorry", "As an AI",
    ...) or one of ``s["refusal_phrases"]`` (case-insensitive, after leading whitespace)."""
    if not s.get("refusal", True):
        return None
    m = REFUSAL_PATTERNS.match(a.text or "")
    if m:
        return CheckResult("refusal", False, f"opens with a refusal phrase: {m.group(0).strip()!r}")
    opening = (a.text or "").lstrip().casefold()
    for phrase in s.get("refusal_phrases") or ():
        p = str(phrase).strip()
        if p and opening.startswith(p.casefold()):
            return CheckResult("refusal", False, f"opens with the refusal phrase {p!r}")
    return CheckResult("refusal", True)


def check_unicode_escapes(a: Answer, task: TaskSpec, s: dict) -> CheckResult:
    """No literal ``\\uXXXX`` escapes in plain text (a sign of double-encoded output). JSON
    answers are checked after parsing, since escapes are legal inside JSON strings."""
    text = a.text or ""
    if task.task_type == "extraction":
        return CheckResult("unicode_escapes", True)
    m = UNICODE_ESCAPE.search(text)
    if m:
        return CheckResult("unicode_escapes", False, f"literal escape {m.group(0)} in the text")
    return CheckResult("unicode_escapes", True)


def check_label(a: Answer, task: TaskSpec, s: dict) -> tuple[CheckResult, str | None] | None:
    """Classification: the answer names exactly one label of the set (case- and
    space-insensitive, see prompts.match_label). Returns the result and the canonical label."""
    if task.task_type != "classification":
        return None
    label = match_label(a.text, task.labels)
    if label is None:
        return CheckResult("label_in_set", False, f"{(a.text or '')[:60]!r} is not one of the {len(task.labels)} labels"), None
    return CheckResult("label_in_set", True, label), label


def check_confidence(a: Answer, task: TaskSpec, s: dict) -> CheckResult | None:
    """Classification with soft labels: the top label's probability is at least
    ``min_confidence`` (default 0.5)."""
    if task.task_type != "classification" or not a.label_probs:
        return None
    threshold = float(s.get("min_confidence", 0.5))
    label, p = max(a.label_probs.items(), key=lambda kv: kv[1])
    if p < threshold:
        return CheckResult("confidence", False, f"top label {label} has probability {p:.2f} < {threshold:.2f}")
    return CheckResult("confidence", True, f"{label} p={p:.2f}")


def parse_json_answer(text: str) -> object:
    """Parse a JSON answer, tolerating one surrounding Markdown code fence. Raises ValueError,
    also for an answer nested deeper than ``json_limits.MAX_DEPTH`` levels (which
    ``jsonschema`` could not validate without overflowing the stack)."""
    m = _FENCE.match(text)
    return loads_bounded(m.group(1) if m else text)


def check_json(a: Answer, task: TaskSpec, s: dict) -> tuple[CheckResult, object] | None:
    """Extraction: the answer parses as JSON and validates against the project's JSON Schema
    (jsonschema, the schema's own draft). Returns the result and the parsed object."""
    if task.task_type != "extraction":
        return None
    try:
        obj = parse_json_answer(a.text or "")
    except ValueError as exc:
        return CheckResult("json_valid", False, f"not valid JSON: {exc}"), None
    if task.output_schema:
        import jsonschema

        cls = jsonschema.validators.validator_for(task.output_schema)
        errors = sorted(cls(task.output_schema).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = "/".join(str(p) for p in e.path) or "(root)"
            return CheckResult("json_schema", False, f"at {where}: {e.message}"), obj
    return CheckResult("json_schema", True), obj


def normalise_for_duplicate(text: str) -> str:
    """Text compared by the duplicate check: NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def duplicate_enabled(task: TaskSpec) -> bool:
    return bool(task.checks.get("duplicate", task.task_type in ("summarization", "generation")))


def check_duplicate(a: Answer, task: TaskSpec, s: dict, seen: set[str] | None) -> CheckResult | None:
    """The answer is not word-for-word another answer already in the run (``seen`` holds their
    normalised texts; the caller adds accepted answers to it)."""
    if seen is None or not duplicate_enabled(task):
        return None
    if normalise_for_duplicate(a.text or "") in seen:
        return CheckResult("duplicate", False, "the same answer was already given to another query")
    return CheckResult("duplicate", True)


def effective_checks(checks: dict | None, task_type: str) -> dict:
    """Every setting ``run_checks`` and the judge read, with its default where ``checks`` (a
    project's ``checks`` dict) leaves it out: ``{min_length, max_length, min_confidence,
    refusal, refusal_phrases, duplicate, judge_teacher, judge_model, judge_rubric,
    judge_min_score}``. Keys it does not know are kept as they are."""
    s = dict(checks or {})
    out = {"min_length": int(s.get("min_length", 1)), "max_length": int(s.get("max_length", 4000)),
           "min_confidence": float(s.get("min_confidence", 0.5)), "refusal": bool(s.get("refusal", True)),
           "refusal_phrases": list(s.get("refusal_phrases") or []),
           "duplicate": bool(s.get("duplicate", task_type in ("summarization", "generation"))),
           "judge_teacher": s.get("judge_teacher") or None, "judge_model": s.get("judge_model") or None,
           "judge_rubric": s.get("judge_rubric") or "", "judge_min_score": int(s.get("judge_min_score", 3))}
    return {**s, **out}


def run_checks(answer: Answer, task: TaskSpec, *, seen: set[str] | None = None) -> Verdict:
    """Run every applicable check on ``answer``; accepted only when all pass.

    A missing answer (content None) still gets the finish-reason check, so ``content_filter`` with
    null content is rejected as ``content_filter`` rather than only as empty."""
    s = task.checks or {}
    results: list[CheckResult] = []
    parsed: object = None
    results.append(check_finish_reason(answer, task, s))
    results.append(check_non_empty(answer, task, s))
    if answer.text is not None and answer.text.strip():
        results.append(check_length(answer, task, s))
        for fn in (check_refusal, check_unicode_escapes):
            r = fn(answer, task, s)
            if r is not None:
                results.append(r)
        lab = check_label(answer, task, s)
        if lab is not None:
            results.append(lab[0])
            parsed = lab[1]
        js = check_json(answer, task, s)
        if js is not None:
            results.append(js[0])
            parsed = js[1]
        conf = check_confidence(answer, task, s)
        if conf is not None:
            results.append(conf)
        dup = check_duplicate(answer, task, s, seen)
        if dup is not None:
            results.append(dup)
    return Verdict(accepted=all(r.passed for r in results), parsed=parsed, checks=results)


# --- LLM judge --------------------------------------------------------------------------------

DEFAULT_RUBRIC = ("Score 5 if the answer is correct, complete and follows the instructions exactly; "
                  "3 if it is acceptable with small flaws; 1 if it is wrong, off-task or malformed.")


def judge_messages(task: TaskSpec, query: str, answer: str, rubric: str | None = None) -> list[dict]:
    """Chat messages asking a judge teacher to grade ``answer`` from 1 to 5 against a rubric."""
    system = ("You grade answers produced for a task. Reply with a single integer from 1 to 5 and nothing else.\n"
              f"Rubric: {rubric or DEFAULT_RUBRIC}")
    user = (f"Task instructions:\n{task.instructions or task.task_type}\n\nQuery:\n{query}\n\n"
            f"Answer to grade:\n{answer}\n\nScore (1-5):")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_judge_score(text: str | None) -> int | None:
    """The first integer 1-5 in the judge's reply, or None when there is none."""
    m = re.search(r"\b([1-5])\b", text or "")
    return int(m.group(1)) if m else None


def check_judge(score: int | None, s: dict) -> CheckResult:
    """The judge's score is at least ``judge_min_score`` (default 3)."""
    threshold = int(s.get("judge_min_score", 3))
    if score is None:
        return CheckResult("judge", False, "the judge gave no score from 1 to 5")
    if score < threshold:
        return CheckResult("judge", False, f"judge score {score}/5 < {threshold}")
    return CheckResult("judge", True, f"judge score {score}/5")
