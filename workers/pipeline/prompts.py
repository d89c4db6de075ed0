"""Prompt templates: the teacher's (long: instructions, label set or schema, few-shot examples)
and the student's (short: a brief task prefix and the query, so every student call is cheaper
than a teacher call). Both return chat messages ``[{"role": ..., "content": ...}]``."""
from __future__ import annotations

import json
import re
import unicodedata

from workers.pipeline.specs import TaskSpec

STUDENT_PREFIX = {
    "classification": "Label: ",
    "extraction": "Extract JSON: ",
    "summarization": "Summarize: ",
    "generation": "",
}


def teacher_system_prompt(task: TaskSpec) -> str:
    """The teacher's system prompt: the project's instructions plus the output contract."""
    parts = [task.instructions.strip()] if task.instructions.strip() else []
    if task.task_type == "classification":
        parts.append("Answer with exactly one label from this list and nothing else:\n" + "\n".join(task.labels))
    elif task.task_type == "extraction":
        parts.append("Answer with one JSON object that validates against this JSON Schema, and nothing else:\n"
                     + json.dumps(task.output_schema, ensure_ascii=False))
    return "\n\n".join(parts)


def teacher_messages(task: TaskSpec, query: str) -> list[dict]:
    """Chat messages sent to the teacher for ``query``: system prompt, few-shot pairs, query."""
    msgs = [{"role": "system", "content": teacher_system_prompt(task)}]
    for ex in task.few_shot:
        msgs.append({"role": "user", "content": str(ex["query"])})
        msgs.append({"role": "assistant", "content": str(ex["answer"])})
    msgs.append({"role": "user", "content": query})
    return msgs


def student_messages(task: TaskSpec, query: str) -> list[dict]:
    """Chat messages for the student: one short user turn (no system prompt, no few-shot)."""
    return [{"role": "user", "content": STUDENT_PREFIX.get(task.task_type, "") + query}]


def student_template(task: TaskSpec) -> str:
    """The student prompt template as text, for display and for the training run's record."""
    return STUDENT_PREFIX.get(task.task_type, "") + "{query}"


def teacher_template(task: TaskSpec) -> str:
    """The teacher prompt template as text (system prompt, few-shot count, query slot)."""
    shots = f"\n[{len(task.few_shot)} few-shot example(s)]" if task.few_shot else ""
    return f"[system]\n{teacher_system_prompt(task)}{shots}\n[user]\n{{query}}"


def _norm_label(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).casefold().strip()
    s = re.sub(r"[\s_\-]+", " ", s)
    return s.strip(" .:;\"'`*")


def match_label(text: str | None, labels: tuple[str, ...] | list[str]) -> str | None:
    """The label ``text`` names, compared case- and space-insensitively (``"Lost card"``
    matches ``lost_card``); also accepts a label on the first line or after ``Label:``.
    Returns the canonical label or None when no single label matches."""
    if not text:
        return None
    table = {_norm_label(l): l for l in labels}
    candidates = [text, text.strip().splitlines()[0] if text.strip() else ""]
    m = re.match(r"\s*(?:label|intent|answer)\s*:\s*(.+)", text, flags=re.I)
    if m:
        candidates.append(m.group(1).splitlines()[0])
    for c in candidates:
        hit = table.get(_norm_label(c))
        if hit is not None:
            return hit
    return None
