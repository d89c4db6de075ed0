"""The generation pipeline without Django: checks, teacher faults against a loopback fault
server, rejection sampling, budget and the ensemble."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.openai_stub import StubServer
from workers.pipeline.checks import Answer, run_checks
from workers.pipeline.generation import Generator, Group
from workers.pipeline.specs import QueryItem, TaskSpec
from workers.pipeline.teachers import (EnsembleTeacher, OpenAITeacher, TeacherConfig, TeacherReply, backoff_s,
                                       label_probs_from_top_logprobs)

CLS = TaskSpec(task_type="classification", labels=("card_arrival", "lost_or_stolen_card"), instructions="Classify.")
EXTRACT = TaskSpec(task_type="extraction", output_schema={"type": "object", "required": ["name", "age"],
                                                          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}})
GEN = TaskSpec(task_type="generation")


def names(v):
    return {c.name: c.passed for c in v.checks}


def test_checks_each_with_name_and_reason():
    v = run_checks(Answer(" Lost or stolen card "), CLS)
    assert v.accepted and v.parsed == "lost_or_stolen_card"
    v = run_checks(Answer("pizza"), CLS)
    assert not v.accepted and v.failed == ["label_in_set"] and "pizza" in v.checks[-1].reason
    v = run_checks(Answer("card_arrival", "length"), CLS)
    assert v.failed == ["truncated"]
    v = run_checks(Answer(None, "content_filter"), CLS)
    assert v.failed == ["content_filter", "non_empty"]
    v = run_checks(Answer("I'm sorry, but I cannot help with that."), GEN)
    assert v.failed == ["refusal"]
    v = run_checks(Answer("caf\\u00e9 is open"), GEN)
    assert v.failed == ["unicode_escapes"]
    v = run_checks(Answer('```json\n{"name": "Ann", "age": 3}\n```'), EXTRACT)
    assert v.accepted and v.parsed == {"name": "Ann", "age": 3}
    v = run_checks(Answer('{"name": "Ann", "age": "three"}'), EXTRACT)
    assert v.failed == ["json_schema"] and "age" in v.checks[-1].reason
    v = run_checks(Answer('{"name": '), EXTRACT)
    assert v.failed == ["json_valid"]
    v = run_checks(Answer("x" * 50), TaskSpec(task_type="generation", checks={"max_length": 10}))
    assert v.failed == ["length"] and "over the maximum of 10" in v.checks[2].reason
    seen = {"the same summary"}
    assert run_checks(Answer("The  same summary"), GEN, seen=seen).failed == ["duplicate"]
    strict = TaskSpec(task_type="classification", labels=CLS.labels, checks={"min_confidence": 0.7})
    v = run_checks(Answer("lost_or_stolen_card", label_probs={"card_arrival": 0.4, "lost_or_stolen_card": 0.6}), strict)
    assert v.failed == ["confidence"] and "lost_or_stolen_card has probability 0.60 < 0.70" in v.checks[-1].reason
    assert run_checks(Answer("lost_or_stolen_card", label_probs={"card_arrival": 0.4, "lost_or_stolen_card": 0.6}), CLS).accepted


def test_backoff_honours_retry_after_and_grows():
    assert backoff_s(1, 7.0) == 7.0
    assert 0.4 <= backoff_s(1) <= 0.6 and 1.6 <= backoff_s(3) <= 2.4 and backoff_s(30) <= 36


def test_label_probs_from_top_logprobs():
    p = label_probs_from_top_logprobs([("card", -0.1), ("lost", -2.0), ("xyz", -3.0)], CLS.labels)
    assert p["card_arrival"] > p["lost_or_stolen_card"] > 0 and abs(sum(p.values()) - 1) < 1e-9


def _run(task, cfg, texts, *, spq=1, budget=None, concurrency=4):
    out = []
    client = OpenAITeacher(cfg, task.labels)
    gen = Generator(task, {cfg.id: client}, {cfg.id: cfg}, emit=out.append, samples_per_query=spq,
                    concurrency=concurrency, budget_usd=budget)
    groups = [Group(QueryItem(i + 1, t), cfg.id) for i, t in enumerate(texts)]
    reason = asyncio.run(gen.run(groups))
    return reason, gen, {r.query_id: r for r in out}, out


@pytest.fixture
def stub():
    s = StubServer(answer=lambda text: '{"name": "Ann", "age": 3}' if "extract" in text else "card_arrival").start()
    yield s
    s.stop()


def test_faults_end_in_the_right_status_and_reason(stub):
    # A 3 s per-request timeout: short for the hang, long enough that the stub's real answers are
    # never timed out on a loaded CI machine (0.5 s could be, and then the retry counts are off).
    cfg = TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=stub.base_url, timeout_s=3.0, max_retries=1)
    texts = ["ok", "[429] busy", "[500] flaky", "[hang] slow", "[length] long", "[filter] nasty"]
    reason, gen, by_q, _ = _run(CLS, cfg, texts)
    assert reason is None
    assert by_q[1].status == "accepted" and by_q[1].parsed == "card_arrival"
    # 429 with Retry-After and a 500: retried once, then answered
    assert by_q[2].status == "accepted" and stub.attempts["[429] busy"] == 2
    assert by_q[3].status == "accepted" and stub.attempts["[500] flaky"] == 2
    # a hang: the per-request timeout fires, retried once, then failed as timeout
    assert by_q[4].status == "failed" and by_q[4].failed_checks == ["timeout"] and "3 s" in by_q[4].error
    assert stub.attempts["[hang] slow"] == 2
    assert by_q[5].status == "rejected" and by_q[5].failed_checks[0] == "truncated" and by_q[5].finish_reason == "length"
    assert by_q[6].status == "rejected" and by_q[6].response is None and "content_filter" in by_q[6].failed_checks
    # tokens and the exact prompt are kept
    assert by_q[1].input_tokens == 20 and by_q[1].output_tokens == 5
    assert by_q[1].prompt[0]["role"] == "system" and by_q[1].prompt[-1] == {"role": "user", "content": "ok"}


def test_invalid_json_is_rejected_for_extraction(stub):
    cfg = TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=stub.base_url)
    _, _, by_q, _ = _run(EXTRACT, cfg, ["extract this", "extract [badjson]"])
    assert by_q[1].status == "accepted" and by_q[1].parsed == {"name": "Ann", "age": 3}
    assert by_q[2].status == "rejected" and by_q[2].failed_checks == ["json_valid"]


def test_insufficient_quota_stops_the_run_at_once(stub):
    cfg = TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=stub.base_url, max_retries=3)
    reason, gen, by_q, _ = _run(CLS, cfg, ["[quota] a"] + [f"q{i}" for i in range(40)], concurrency=1)
    assert reason == "insufficient_quota" and "insufficient_quota" in gen.stop_message
    assert stub.attempts["[quota] a"] == 1  # never retried
    assert len(by_q) == 0 and stub.total_completed == 0


def test_budget_stops_before_the_cap_is_passed(stub):
    cfg = TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=stub.base_url, max_tokens=10,
                        price_in_per_1m=1000.0, price_out_per_1m=1000.0)
    reason, gen, by_q, out = _run(CLS, cfg, [f"q{i}" for i in range(30)], budget=0.5, concurrency=2)
    spent = sum(r.cost_usd for r in out)
    assert reason == "budget" and 0 < len(out) < 30
    assert spent <= 0.5 and all(r.cost_usd == pytest.approx(0.025) for r in out)


def test_rejection_sampling_keeps_the_first_that_passes():
    answers = iter(["nonsense", "still wrong", "card_arrival", "card_arrival"])
    s = StubServer(answer=lambda text: next(answers)).start()
    try:
        cfg = TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=s.base_url, temperature=0.7)
        _, _, _, out = _run(CLS, cfg, ["one query"], spq=4, concurrency=1)
    finally:
        s.stop()
    assert [(r.sample_index, r.status) for r in out] == [(0, "rejected"), (1, "rejected"), (2, "accepted")]


class _Fixed:
    def __init__(self, reply):
        self.reply = reply

    async def answer(self, messages, *, seed=None, temperature=None):
        return self.reply

    async def close(self):
        pass


def test_ensemble_averages_probabilities_or_votes():
    cfg = TeacherConfig(id=9, name="ens", provider="ensemble")
    a = _Fixed(TeacherReply("card_arrival", "stop", 10, 1, 0.1, label_probs={"card_arrival": 0.55, "lost_or_stolen_card": 0.45}))
    b = _Fixed(TeacherReply("lost_or_stolen_card", "stop", 10, 1, 0.2, label_probs={"card_arrival": 0.2, "lost_or_stolen_card": 0.8}))
    r = asyncio.run(EnsembleTeacher(cfg, [a, b], CLS.labels, "classification").answer([]))
    assert r.text == "lost_or_stolen_card" and r.label_probs["lost_or_stolen_card"] == pytest.approx(0.625)
    assert r.cost_usd == pytest.approx(0.3) and r.input_tokens == 20
    votes = [_Fixed(TeacherReply(t)) for t in ("Card arrival", "lost_or_stolen_card", "card_arrival")]
    r = asyncio.run(EnsembleTeacher(cfg, votes, CLS.labels, "classification").answer([]))
    assert r.text == "card_arrival" and r.label_probs is None
    # other tasks: the first member answer that passes the checks
    gen_members = [_Fixed(TeacherReply("I'm sorry, I can't.", "stop")), _Fixed(TeacherReply("A fine answer.", "stop"))]
    ens = EnsembleTeacher(cfg, gen_members, (), "generation")
    out = []
    g = Generator(GEN, {9: ens}, {9: cfg}, emit=out.append)
    asyncio.run(g.run([Group(QueryItem(1, "q"), 9)]))
    assert out[0].response == "A fine answer." and out[0].status == "accepted"
    assert any(c["name"] == "ensemble" and "member answer 2" in c["reason"] for c in out[0].checks)


def test_llm_judge_keeps_the_best_of_n():
    answers = iter(["first draft", "second draft", "third draft"])
    gen_server = StubServer(answer=lambda text: next(answers)).start()
    scores = {"first draft": "3", "second draft": "5", "third draft": "1"}
    judge_server = StubServer(answer=lambda text: scores[text.split("Answer to grade:\n")[1].split("\n")[0]]).start()
    try:
        task = TaskSpec(task_type="generation", checks={"judge_teacher": "judge", "judge_min_score": 3})
        cfg = TeacherConfig(id=1, name="t", provider="openai", model="m", base_url=gen_server.base_url, temperature=0.8)
        jcfg = TeacherConfig(id=2, name="judge", provider="openai", model="m", base_url=judge_server.base_url)
        out = []
        g = Generator(task, {1: OpenAITeacher(cfg)}, {1: cfg}, emit=out.append, samples_per_query=3, concurrency=1,
                      judge=OpenAITeacher(jcfg))
        asyncio.run(g.run([Group(QueryItem(1, "write"), 1)]))
    finally:
        gen_server.stop()
        judge_server.stop()
    st = {r.response: (r.status, r.failed_checks) for r in out}
    assert st == {"first draft": ("rejected", ["best_of_n"]), "second draft": ("accepted", []),
                  "third draft": ("rejected", ["judge"])}
    assert json.dumps(out[0].checks)  # stored as JSON
