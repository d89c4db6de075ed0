"""workers/pipeline/checks.py: each quality check on its own (pass and fail, with the reason),
then run_checks as a whole, then the LLM-judge helpers. Pure functions: no database."""
from __future__ import annotations

import json

import pytest

from workers.pipeline.checks import (
    Answer,
    CheckResult,
    check_confidence,
    check_duplicate,
    check_finish_reason,
    check_json,
    check_judge,
    check_label,
    check_length,
    check_non_empty,
    check_refusal,
    check_unicode_escapes,
    judge_messages,
    normalise_for_duplicate,
    parse_judge_score,
    parse_json_answer,
    run_checks,
)
from workers.pipeline.json_limits import MAX_DEPTH
from workers.pipeline.specs import TaskSpec

CLS = TaskSpec(task_type="classification", instructions="Pick the intent.",
               labels=("card_arrival", "lost_or_stolen_card", "refund_not_showing_up"))
SCHEMA = {"type": "object", "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}},
          "required": ["amount", "currency"], "additionalProperties": False}
EXT = TaskSpec(task_type="extraction", output_schema=SCHEMA)
SUM = TaskSpec(task_type="summarization")
GEN = TaskSpec(task_type="generation")


# --- finish reason -------------------------------------------------------------------------------

def test_finish_reason_stop_passes():
    r = check_finish_reason(Answer("ok"), GEN, {})
    assert r == CheckResult("finish_reason", True, "stop")


def test_finish_reason_empty_string_reads_as_stop():
    assert check_finish_reason(Answer("ok", finish_reason=""), GEN, {}) == CheckResult("finish_reason", True, "stop")


def test_finish_reason_length_is_truncated():
    r = check_finish_reason(Answer("half an ans", finish_reason="length"), GEN, {})
    assert (r.name, r.passed) == ("truncated", False)
    assert "finish_reason=length" in r.reason


def test_finish_reason_content_filter():
    r = check_finish_reason(Answer(None, finish_reason="content_filter"), GEN, {})
    assert (r.name, r.passed) == ("content_filter", False)
    assert "content filter" in r.reason


# --- non-empty -----------------------------------------------------------------------------------

def test_non_empty_passes_on_text():
    assert check_non_empty(Answer(" x "), GEN, {}) == CheckResult("non_empty", True)


@pytest.mark.parametrize("text,reason", [("", "the answer is empty"), ("  \n\t", "the answer is empty"),
                                         (None, "no content returned")])
def test_non_empty_fails_with_reason(text, reason):
    assert check_non_empty(Answer(text), GEN, {}) == CheckResult("non_empty", False, reason)


# --- length --------------------------------------------------------------------------------------

def test_length_defaults_pass_and_count_stripped_characters():
    r = check_length(Answer("  hello  "), GEN, {})
    assert r == CheckResult("length", True, "5 characters")


def test_length_under_minimum():
    r = check_length(Answer("hi"), GEN, {"min_length": 3})
    assert r == CheckResult("length", False, "2 characters, under the minimum of 3")


def test_length_over_maximum():
    r = check_length(Answer("x" * 11), GEN, {"max_length": "10"})  # settings may arrive as strings
    assert r == CheckResult("length", False, "11 characters, over the maximum of 10")


def test_length_default_maximum_is_4000():
    assert check_length(Answer("x" * 4000), GEN, {}).passed
    assert not check_length(Answer("x" * 4001), GEN, {}).passed


# --- refusal -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["I'm sorry, I cannot help with that.", "As an AI, I do not have opinions.",
                                  "  i can't do that", "Unfortunately, I cannot answer.", "I am unable to comply"])
def test_refusal_detected(text):
    r = check_refusal(Answer(text), GEN, {})
    assert (r.name, r.passed) == ("refusal", False)
    assert r.reason.startswith("opens with a refusal phrase: ")


def test_refusal_reason_quotes_the_phrase():
    assert check_refusal(Answer("Sorry, but I won't"), GEN, {}).reason == "opens with a refusal phrase: 'Sorry, but I'"


def test_refusal_only_at_the_start():
    assert check_refusal(Answer("The customer says I'm sorry for the late payment."), GEN, {}) == \
        CheckResult("refusal", True)


def test_refusal_check_off():
    assert check_refusal(Answer("I'm sorry, no."), GEN, {"refusal": False}) is None


def test_refusal_custom_phrases_case_insensitive_at_the_start():
    s = {"refusal_phrases": ["Computer says no", "  "]}
    assert check_refusal(Answer("  computer SAYS no, try later"), GEN, s) == \
        CheckResult("refusal", False, "opens with the refusal phrase 'Computer says no'")
    assert check_refusal(Answer("The computer says no."), GEN, s) == CheckResult("refusal", True)
    # Built-in phrases still apply; with the check off, custom phrases are ignored too.
    assert check_refusal(Answer("I cannot help"), GEN, s).passed is False
    assert check_refusal(Answer("Computer says no"), GEN, {**s, "refusal": False}) is None


def test_effective_checks_fills_defaults_and_keeps_unknown_keys():
    from workers.pipeline.checks import effective_checks

    e = effective_checks({"min_length": 5, "custom": 1}, "classification")
    assert e == {"min_length": 5, "max_length": 4000, "min_confidence": 0.5, "refusal": True, "refusal_phrases": [],
                 "duplicate": False, "judge_teacher": None, "judge_model": None, "judge_rubric": "",
                 "judge_min_score": 3, "custom": 1}
    assert effective_checks(None, "generation")["duplicate"] is True


# --- unicode escapes -----------------------------------------------------------------------------

def test_unicode_escape_in_plain_text_fails():
    r = check_unicode_escapes(Answer(r"caf\u00e9 is open"), SUM, {})
    assert r == CheckResult("unicode_escapes", False, r"literal escape \u00e9 in the text")


def test_unicode_real_characters_pass():
    assert check_unicode_escapes(Answer("café is open"), SUM, {}).passed


def test_unicode_escape_allowed_in_extraction_json():
    assert check_unicode_escapes(Answer(r'{"currency": "\u20ac", "amount": 1}'), EXT, {}).passed


# --- label ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["lost_or_stolen_card", "Lost or stolen card", "LOST-OR-STOLEN-CARD.",
                                  "Label: lost_or_stolen_card", "lost_or_stolen_card\nbecause the card is gone"])
def test_label_matches_canonical(text):
    r, label = check_label(Answer(text), CLS, {})
    assert r == CheckResult("label_in_set", True, "lost_or_stolen_card")
    assert label == "lost_or_stolen_card"


def test_label_not_in_set():
    r, label = check_label(Answer("billing_question"), CLS, {})
    assert label is None
    assert (r.name, r.passed) == ("label_in_set", False)
    assert r.reason == "'billing_question' is not one of the 3 labels"


def test_label_not_applicable_to_other_tasks():
    assert check_label(Answer("card_arrival"), SUM, {}) is None


# --- confidence ----------------------------------------------------------------------------------

def test_confidence_passes_at_threshold():
    r = check_confidence(Answer("card_arrival", label_probs={"card_arrival": 0.5, "lost_or_stolen_card": 0.5}),
                         CLS, {})
    assert r.passed and r.name == "confidence"


def test_confidence_fails_below_threshold_names_top_label():
    probs = {"card_arrival": 0.2, "lost_or_stolen_card": 0.45, "refund_not_showing_up": 0.35}
    r = check_confidence(Answer("lost_or_stolen_card", label_probs=probs), CLS, {})
    assert r == CheckResult("confidence", False, "top label lost_or_stolen_card has probability 0.45 < 0.50")


def test_confidence_custom_threshold():
    probs = {"card_arrival": 0.8, "lost_or_stolen_card": 0.2}
    assert not check_confidence(Answer("card_arrival", label_probs=probs), CLS, {"min_confidence": 0.9}).passed
    assert check_confidence(Answer("card_arrival", label_probs=probs), CLS, {"min_confidence": 0.7}).reason == \
        "card_arrival p=0.80"


def test_confidence_not_applicable_without_probs_or_for_other_tasks():
    assert check_confidence(Answer("card_arrival"), CLS, {}) is None
    assert check_confidence(Answer("x", label_probs={"a": 0.1}), SUM, {}) is None


# --- JSON ----------------------------------------------------------------------------------------

def test_parse_json_answer_plain_and_fenced():
    assert parse_json_answer('{"a": 1}') == {"a": 1}
    assert parse_json_answer('```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_json_answer('```\n{"a": 1}\n```') == {"a": 1}


def test_parse_json_answer_too_deep_is_value_error():
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(ValueError):
        parse_json_answer(deep)


def test_json_valid_against_schema():
    r, obj = check_json(Answer('{"amount": 12.5, "currency": "EUR"}'), EXT, {})
    assert r == CheckResult("json_schema", True)
    assert obj == {"amount": 12.5, "currency": "EUR"}


def test_json_unparseable():
    r, obj = check_json(Answer("amount: twelve"), EXT, {})
    assert obj is None
    assert (r.name, r.passed) == ("json_valid", False)
    assert r.reason.startswith("not valid JSON: ")


def test_json_schema_violation_names_the_path():
    r, obj = check_json(Answer('{"amount": "twelve", "currency": "EUR"}'), EXT, {})
    assert obj == {"amount": "twelve", "currency": "EUR"}
    assert (r.name, r.passed) == ("json_schema", False)
    assert r.reason == "at amount: 'twelve' is not of type 'number'"


def test_json_schema_violation_at_root():
    r, _ = check_json(Answer('{"amount": 1}'), EXT, {})
    assert r.reason == "at (root): 'currency' is a required property"


def test_json_without_schema_only_parses():
    r, obj = check_json(Answer("[1, 2]"), TaskSpec(task_type="extraction"), {})
    assert r.passed and obj == [1, 2]


def test_json_not_applicable_to_classification():
    assert check_json(Answer("{}"), CLS, {}) is None


# --- duplicate -----------------------------------------------------------------------------------

def test_normalise_for_duplicate():
    assert normalise_for_duplicate("  The  Card\nARRIVED ") == "the card arrived"
    assert normalise_for_duplicate("ﬁne") == "fine"  # NFKC folds the ligature


def test_duplicate_detected_after_normalisation():
    seen = {normalise_for_duplicate("The card arrived.")}
    r = check_duplicate(Answer("the  CARD arrived."), SUM, {}, seen)
    assert r == CheckResult("duplicate", False, "the same answer was already given to another query")
    assert check_duplicate(Answer("The card is lost."), SUM, {}, seen) == CheckResult("duplicate", True)


def test_duplicate_defaults_per_task_type():
    seen = {"card_arrival"}
    assert check_duplicate(Answer("card_arrival"), CLS, {}, seen) is None  # off for classification
    on = TaskSpec(task_type="classification", labels=CLS.labels, checks={"duplicate": True})
    assert not check_duplicate(Answer("card_arrival"), on, on.checks, seen).passed
    off = TaskSpec(task_type="summarization", checks={"duplicate": False})
    assert check_duplicate(Answer("card_arrival"), off, off.checks, seen) is None
    assert check_duplicate(Answer("x"), SUM, {}, None) is None


# --- run_checks ----------------------------------------------------------------------------------

def test_run_checks_classification_accepted():
    v = run_checks(Answer("Refund not showing up"), CLS)
    assert v.accepted
    assert v.parsed == "refund_not_showing_up"
    assert [c.name for c in v.checks] == ["finish_reason", "non_empty", "length", "refusal", "unicode_escapes",
                                          "label_in_set"]
    assert v.failed == []


def test_run_checks_classification_low_confidence_rejected():
    v = run_checks(Answer("card_arrival", label_probs={"card_arrival": 0.4, "lost_or_stolen_card": 0.3,
                                                       "refund_not_showing_up": 0.3}), CLS)
    assert not v.accepted
    assert v.failed == ["confidence"]
    assert v.parsed == "card_arrival"


def test_run_checks_extraction_parsed_object():
    v = run_checks(Answer('```json\n{"amount": 3, "currency": "USD"}\n```'), EXT)
    assert v.accepted
    assert v.parsed == {"amount": 3, "currency": "USD"}
    assert "json_schema" in [c.name for c in v.checks]
    assert "label_in_set" not in [c.name for c in v.checks]


def test_run_checks_truncated_json_fails_twice():
    v = run_checks(Answer('{"amount": 3, "curr', finish_reason="length"), EXT)
    assert not v.accepted
    assert v.failed == ["truncated", "json_valid"]


def test_run_checks_null_content_filter():
    v = run_checks(Answer(None, finish_reason="content_filter"), GEN)
    assert not v.accepted
    assert v.failed == ["content_filter", "non_empty"]
    assert [c.name for c in v.checks] == ["content_filter", "non_empty"]
    assert v.parsed is None


def test_run_checks_uses_task_settings():
    task = TaskSpec(task_type="generation", checks={"max_length": 5, "refusal": False})
    v = run_checks(Answer("I'm sorry, that is too long"), task)
    assert v.failed == ["length"]
    assert "refusal" not in [c.name for c in v.checks]


def test_run_checks_duplicate_with_seen():
    seen: set[str] = set()
    first = run_checks(Answer("A short summary."), SUM, seen=seen)
    assert first.accepted
    seen.add(normalise_for_duplicate("A short summary."))  # the caller adds accepted answers
    second = run_checks(Answer("a short  summary."), SUM, seen=seen)
    assert second.failed == ["duplicate"]


def test_run_checks_results_serialise():
    v = run_checks(Answer("I cannot"), GEN)
    dumped = json.dumps([c.as_dict() for c in v.checks])
    assert json.loads(dumped)[3] == {"name": "refusal", "passed": False,
                                     "reason": "opens with a refusal phrase: 'I cannot'"}


# --- LLM judge -----------------------------------------------------------------------------------

def test_judge_messages_carry_task_query_answer_and_rubric():
    msgs = judge_messages(CLS, "where is my card?", "card_arrival", rubric="5 if right")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].endswith("Rubric: 5 if right")
    assert "Pick the intent." in msgs[1]["content"]
    assert "Query:\nwhere is my card?" in msgs[1]["content"]
    assert "Answer to grade:\ncard_arrival" in msgs[1]["content"]


def test_judge_messages_default_rubric_and_task_type():
    msgs = judge_messages(SUM, "q", "a")
    assert "Score 5 if the answer is correct" in msgs[0]["content"]
    assert msgs[1]["content"].startswith("Task instructions:\nsummarization")


@pytest.mark.parametrize("text,score", [("4", 4), ("Score: 5/5", 5), ("I'd say 2.", 2), ("10 out of 10", None),
                                        ("", None), (None, None), ("0", None)])
def test_parse_judge_score(text, score):
    assert parse_judge_score(text) == score


def test_check_judge():
    assert check_judge(3, {}) == CheckResult("judge", True, "judge score 3/5")
    assert check_judge(2, {}) == CheckResult("judge", False, "judge score 2/5 < 3")
    assert check_judge(4, {"judge_min_score": "5"}) == CheckResult("judge", False, "judge score 4/5 < 5")
    assert check_judge(None, {}) == CheckResult("judge", False, "the judge gave no score from 1 to 5")
