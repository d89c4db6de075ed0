"""workers/pipeline/prompts.py: teacher and student messages, templates and label matching."""
from __future__ import annotations

import json

import pytest

from workers.pipeline.prompts import (
    STUDENT_PREFIX,
    match_label,
    student_messages,
    student_template,
    teacher_messages,
    teacher_system_prompt,
    teacher_template,
)
from workers.pipeline.specs import TaskSpec

LABELS = ("card_arrival", "lost_or_stolen_card", "refund_not_showing_up")
CLS = TaskSpec(task_type="classification", instructions="  Classify the message.  ", labels=LABELS,
               few_shot=({"query": "my card never came", "answer": "card_arrival"},
                         {"query": "someone took my card", "answer": "lost_or_stolen_card"}))
SCHEMA = {"type": "object", "properties": {"città": {"type": "string"}}}
EXT = TaskSpec(task_type="extraction", instructions="Extract the city.", output_schema=SCHEMA)


def test_system_prompt_classification_lists_labels():
    assert teacher_system_prompt(CLS) == ("Classify the message.\n\nAnswer with exactly one label from this list and "
                                          "nothing else:\ncard_arrival\nlost_or_stolen_card\nrefund_not_showing_up")


def test_system_prompt_extraction_carries_schema_unescaped():
    prompt = teacher_system_prompt(EXT)
    head, schema_text = prompt.split("JSON Schema, and nothing else:\n")
    assert head.startswith("Extract the city.\n\nAnswer with one JSON object")
    assert json.loads(schema_text) == SCHEMA
    assert "città" in schema_text  # ensure_ascii=False: no \u escapes for the teacher to copy


def test_system_prompt_without_instructions():
    assert teacher_system_prompt(TaskSpec(task_type="summarization", instructions="   ")) == ""
    assert teacher_system_prompt(TaskSpec(task_type="generation", instructions="Write a reply.")) == "Write a reply."


def test_teacher_messages_order_system_fewshot_query():
    msgs = teacher_messages(CLS, "where is my refund?")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == teacher_system_prompt(CLS)
    assert msgs[1:5] == [{"role": "user", "content": "my card never came"},
                         {"role": "assistant", "content": "card_arrival"},
                         {"role": "user", "content": "someone took my card"},
                         {"role": "assistant", "content": "lost_or_stolen_card"}]
    assert msgs[-1] == {"role": "user", "content": "where is my refund?"}


def test_teacher_messages_stringify_few_shot_values():
    task = TaskSpec(task_type="extraction", output_schema={}, few_shot=({"query": 42, "answer": {"a": 1}},))
    msgs = teacher_messages(task, "q")
    assert msgs[1]["content"] == "42"
    assert msgs[2]["content"] == "{'a': 1}"


@pytest.mark.parametrize("task_type,content", [("classification", "Label: hello"), ("extraction", "Extract JSON: hello"),
                                               ("summarization", "Summarize: hello"), ("generation", "hello"),
                                               ("something_else", "hello")])
def test_student_messages_one_short_turn(task_type, content):
    assert student_messages(TaskSpec(task_type=task_type), "hello") == [{"role": "user", "content": content}]


def test_student_prompt_shorter_than_teacher_prompt():
    q = "my card has not arrived yet"
    student = sum(len(m["content"]) for m in student_messages(CLS, q))
    teacher = sum(len(m["content"]) for m in teacher_messages(CLS, q))
    assert student < teacher


def test_templates():
    assert student_template(CLS) == "Label: {query}"
    assert student_template(TaskSpec(task_type="generation")) == "{query}"
    assert set(STUDENT_PREFIX) == {"classification", "extraction", "summarization", "generation"}
    t = teacher_template(CLS)
    assert t == f"[system]\n{teacher_system_prompt(CLS)}\n[2 few-shot example(s)]\n[user]\n{{query}}"
    assert teacher_template(TaskSpec(task_type="generation", instructions="Be brief.")) == \
        "[system]\nBe brief.\n[user]\n{query}"


@pytest.mark.parametrize("text", ["lost_or_stolen_card", "Lost or stolen card", "  LOST-OR-STOLEN_CARD ",
                                  "lost or stolen card.", '"lost_or_stolen_card"', "**lost_or_stolen_card**",
                                  "Label: lost or stolen card", "intent: Lost_or_stolen_card\nextra",
                                  "lost_or_stolen_card\nThe customer says their card was stolen."])
def test_match_label_variants(text):
    assert match_label(text, LABELS) == "lost_or_stolen_card"


@pytest.mark.parametrize("text", [None, "", "   ", "stolen", "card_arrival or lost_or_stolen_card",
                                  "The label is card_arrival"])
def test_match_label_none(text):
    assert match_label(text, LABELS) is None


def test_match_label_accepts_a_list_and_nfkc():
    assert match_label("ＣＡＲＤ_ＡＲＲＩＶＡＬ", list(LABELS)) == "card_arrival"  # full-width letters
