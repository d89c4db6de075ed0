"""workers/pipeline/teachers.py on its own: TeacherConfig costs, backoff and Retry-After
parsing, soft labels from top logprobs, OpenAITeacher.answer against loopback fault servers
(tests/openai_stub.py, plus a scripted server for statuses the stub does not make), make_client
and the ensemble's failure paths. The whole generation pipeline over the same faults is
tests/test_generation_pipeline.py; here each TeacherReply is checked field by field."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.openai_stub import StubServer
from workers.pipeline.security import SecurityPolicy
from workers.pipeline.teachers import (
    EnsembleTeacher,
    OpenAITeacher,
    RunStopped,
    TeacherConfig,
    TeacherReply,
    _retry_after,
    backoff_s,
    label_probs_from_top_logprobs,
    make_client,
)

LABELS = ("card_arrival", "lost_or_stolen_card", "refund_not_showing_up")
LOOPBACK = SecurityPolicy(allow_private_teacher_urls=True)


def cfg(base_url: str, **kw) -> TeacherConfig:
    kw.setdefault("policy", LOOPBACK)
    return TeacherConfig(id=1, name="stub", provider="openai", model="m", base_url=base_url, **kw)


def ask(teacher, text: str, **kw) -> TeacherReply:
    async def go():
        try:
            return await teacher.answer([{"role": "user", "content": text}], **kw)
        finally:
            await teacher.close()

    return asyncio.run(go())


@pytest.fixture
def stub():
    s = StubServer(answer=lambda text: "card_arrival").start()
    yield s
    s.stop()


class Scripted:
    """A loopback server that answers each POST with the next ``(status, body, headers)`` of a
    script (the last one repeats) and records every request body and Authorization header."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        me = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                me.requests.append(json.loads(self.rfile.read(n) or b"{}"))
                me.auth.append(self.headers.get("Authorization"))
                status, body, headers = me.responses[min(len(me.requests), len(me.responses)) - 1]
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*responses):
        s = Scripted(*responses)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def completion(content, finish="stop", logprobs=None, usage=(20, 5)):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "choices": [choice],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


# --- TeacherConfig, backoff, Retry-After ---------------------------------------------------------

def test_cost_usd_and_estimate():
    c = TeacherConfig(id=1, name="t", provider="openai", price_in_per_1m=2.0, price_out_per_1m=8.0, max_tokens=100)
    assert c.cost_usd(1_000_000, 0) == pytest.approx(2.0)
    assert c.cost_usd(1000, 500) == pytest.approx(0.002 + 0.004)
    # 30 characters -> ceil(30/3) + 8 = 18 input tokens; max_tokens output tokens
    msgs = [{"role": "system", "content": "x" * 10}, {"role": "user", "content": "y" * 20}, {"role": "user", "content": None}]
    assert c.estimate_cost_usd(msgs) == pytest.approx(c.cost_usd(18, 100))
    assert TeacherConfig(id=2, name="free", provider="openai").estimate_cost_usd(msgs) == 0.0


def test_backoff_retry_after_capped_and_jittered_exponential():
    assert backoff_s(3, 0.0) == 0.0
    assert backoff_s(1, 500.0) == 120.0
    assert 0.8 <= backoff_s(2) <= 1.2  # 0.5 * 2 with +-20 %
    assert 24.0 <= backoff_s(10) <= 36.0  # capped at 30 s before jitter
    assert 0.08 <= backoff_s(1, -1.0, base=0.1) <= 0.12  # a negative Retry-After is ignored


def test_retry_after_header_forms():
    assert _retry_after(None) is None
    assert _retry_after({}) is None
    assert _retry_after({"retry-after": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5  # the ms header wins
    assert _retry_after({"retry-after": "soon"}) is None
    when = _retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert 25.0 <= when <= 31.0
    assert _retry_after({"retry-after": formatdate(time.time() - 60, usegmt=True)}) == 0.0


# --- soft labels from top logprobs ---------------------------------------------------------------

def test_label_probs_split_between_labels_sharing_a_prefix():
    import math

    p = label_probs_from_top_logprobs([("card", math.log(0.6)), (" re", math.log(0.2)), ("lost", math.log(0.2))],
                                      ("card_arrival", "card_delivery", "refund_not_showing_up", "lost_or_stolen_card"))
    assert p == pytest.approx({"card_arrival": 0.3, "card_delivery": 0.3, "refund_not_showing_up": 0.2,
                               "lost_or_stolen_card": 0.2})


def test_label_probs_none_without_a_match():
    assert label_probs_from_top_logprobs([("pizza", -0.1), ("  ", -0.2)], LABELS) is None
    assert label_probs_from_top_logprobs([], LABELS) is None
    assert label_probs_from_top_logprobs([("card", -0.1)], ()) is None


# --- OpenAITeacher against the fault stub --------------------------------------------------------

def test_plain_answer_fields(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url, price_in_per_1m=1.0, price_out_per_1m=2.0)), "hello")
    assert (r.text, r.finish_reason, r.input_tokens, r.output_tokens, r.attempts) == ("card_arrival", "stop", 20, 5, 1)
    assert r.cost_usd == pytest.approx(20e-6 + 10e-6)
    assert not r.failed and r.error == "" and r.latency_ms > 0
    assert r.label_probs is None and r.token_logprobs is None


def test_429_waits_for_retry_after_then_answers(stub):
    t0 = time.perf_counter()
    r = ask(OpenAITeacher(cfg(stub.base_url, max_retries=2)), "[429] busy")
    assert time.perf_counter() - t0 >= 0.95  # the stub's Retry-After: 1
    assert (r.text, r.attempts, r.failed) == ("card_arrival", 2, False)
    assert stub.attempts["[429] busy"] == 2


def test_429_without_retries_left_is_rate_limited(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url, max_retries=0)), "[429] busy")
    assert r.failed and r.text is None
    assert r.error_kind == "rate_limited"
    assert r.error == "429 rate limited: Rate limit reached (after 1 attempts)"
    assert stub.attempts["[429] busy"] == 1


def test_500_retried_then_answers(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url, max_retries=1)), "[500] flaky")
    assert (r.text, r.attempts) == ("card_arrival", 2)


def test_500_without_retries_left_is_server_error(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url, max_retries=0)), "[500] flaky")
    assert (r.error_kind, r.error) == ("server_error", "500 server error: upstream hiccup (after 1 attempts)")


def test_timeout_is_retried_then_fails_as_timeout(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url, timeout_s=0.3, max_retries=1)), "[hang] slow")
    assert r.error_kind == "timeout"
    assert r.error == "no answer within 0.3 s (after 2 attempts)"
    assert r.attempts == 2 and stub.attempts["[hang] slow"] == 2
    stub.release()


def test_finish_reason_length_is_returned_not_retried(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url)), "[length] long")
    assert (r.text, r.finish_reason, r.attempts, r.failed) == ("This answer was cut off in the mid", "length", 1, False)
    assert stub.attempts["[length] long"] == 1


def test_content_filter_null_content(stub):
    r = ask(OpenAITeacher(cfg(stub.base_url)), "[filter] x")
    assert (r.text, r.finish_reason, r.failed) == (None, "content_filter", False)


def test_insufficient_quota_raises_run_stopped(stub):
    with pytest.raises(RunStopped) as exc:
        ask(OpenAITeacher(cfg(stub.base_url, max_retries=3)), "[quota] x")
    assert exc.value.reason == "insufficient_quota"
    assert str(exc.value) == "teacher stub: insufficient_quota: You exceeded your current quota."
    assert stub.attempts["[quota] x"] == 1


def test_connection_refused_is_connection_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = ask(OpenAITeacher(cfg(f"http://127.0.0.1:{port}/v1", max_retries=0)), "hi")
    assert r.error_kind == "connection" and r.error.startswith("connection error: ")


# --- OpenAITeacher against scripted responses ---------------------------------------------------

def test_request_body_and_key(scripted, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-123")
    s = scripted((200, completion("ok"), None))
    t = OpenAITeacher(cfg(s.base_url, api_key_env="OPENAI_API_KEY", temperature=0.3, max_tokens=7, top_logprobs=5))
    ask(t, "hi", temperature=0.0)
    body = s.requests[0]
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert s.auth[0] == "Bearer test-key-123"


def test_no_key_no_model_defaults(scripted):
    s = scripted((200, completion("ok"), None))
    ask(OpenAITeacher(TeacherConfig(id=1, name="t", provider="openai", base_url=s.base_url, policy=LOOPBACK)), "hi")
    assert s.requests[0]["model"] == "default" and "logprobs" not in s.requests[0]
    assert s.auth[0] == "Bearer not-needed"


def test_logprobs_become_label_probs(scripted):
    import math

    lp = [{"token": "lost", "logprob": math.log(0.7), "top_logprobs": [
        {"token": "lost", "logprob": math.log(0.7)}, {"token": "card", "logprob": math.log(0.2)},
        {"token": "hello", "logprob": math.log(0.1)}]}]
    s = scripted((200, completion("lost_or_stolen_card", logprobs=lp), None))
    r = ask(OpenAITeacher(cfg(s.base_url, top_logprobs=3), LABELS), "q")
    assert r.label_probs == pytest.approx({"card_arrival": 0.2 / 0.9, "lost_or_stolen_card": 0.7 / 0.9,
                                           "refund_not_showing_up": 0.0})
    assert r.token_logprobs[0]["token"] == "lost" and len(r.token_logprobs[0]["top"]) == 3


def test_401_raises_authentication(scripted):
    s = scripted((401, {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}, None))
    with pytest.raises(RunStopped) as exc:
        ask(OpenAITeacher(cfg(s.base_url, max_retries=3)), "q")
    assert exc.value.reason == "authentication" and "Incorrect API key" in str(exc.value)
    assert len(s.requests) == 1


def test_400_is_bad_request_not_retried(scripted):
    s = scripted((400, {"error": {"message": "max_tokens is too large"}}, None))
    r = ask(OpenAITeacher(cfg(s.base_url, max_retries=3)), "q")
    assert (r.error_kind, r.error, r.attempts) == ("bad_request", "400: max_tokens is too large", 1)
    assert len(s.requests) == 1


def test_503_retry_after_ms_then_answer(scripted):
    s = scripted((503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "50"}), (200, completion("fine"), None))
    r = ask(OpenAITeacher(cfg(s.base_url, max_retries=1)), "q")
    assert (r.text, r.attempts) == ("fine", 2)


@pytest.mark.parametrize("body,error", [({"choices": []}, "the response has no choices"),
                                        ({"object": "error"}, "the response has no choices")])
def test_response_without_choices_is_invalid(scripted, body, error):
    r = ask(OpenAITeacher(cfg(scripted((200, body, None)).base_url)), "q")
    assert (r.error_kind, r.error) == ("invalid_response", error)


def test_response_not_json_is_invalid(scripted):
    r = ask(OpenAITeacher(cfg(scripted((200, "<html>gateway</html>", None)).base_url)), "q")
    assert r.error_kind == "invalid_response" and r.error.startswith("invalid response: ")


# --- construction: policy and keys ---------------------------------------------------------------

def test_missing_key_variable_stops(monkeypatch, stub):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RunStopped) as exc:
        OpenAITeacher(cfg(stub.base_url, api_key_env="OPENAI_API_KEY"))
    assert exc.value.reason == "authentication"
    assert str(exc.value) == "teacher stub: environment variable OPENAI_API_KEY is not set"


def test_pasted_key_refused_without_echoing_it(stub):
    with pytest.raises(RunStopped) as exc:
        OpenAITeacher(cfg(stub.base_url, api_key_env="sk-abcdef0123456789abcdef"))
    assert exc.value.reason == "refused" and "sk-abcdef" not in str(exc.value)
    assert str(exc.value).startswith("teacher stub: api_key_env: ")


def test_loopback_url_refused_by_default_policy(stub):
    with pytest.raises(RunStopped) as exc:
        OpenAITeacher(cfg(stub.base_url, policy=SecurityPolicy()))
    assert exc.value.reason == "refused" and "base_url" in str(exc.value)


# --- make_client and the ensemble ----------------------------------------------------------------

def test_make_client_kinds(stub):
    ens = TeacherConfig(id=3, name="ens", provider="ensemble", members=(cfg(stub.base_url), cfg(stub.base_url)))
    e = make_client(ens, labels=LABELS, task_type="classification")
    assert isinstance(e, EnsembleTeacher) and len(e.members) == 2
    assert not e.deterministic  # API members are never deterministic
    r = ask(e, "q")  # answers and closes every member in one event loop
    assert r.text == "card_arrival" and r.input_tokens == 40
    assert r.extra_checks == [("ensemble", True, "majority vote of 2 member(s)")]
    c = make_client(cfg(stub.base_url), labels=LABELS, task_type="classification")
    assert isinstance(c, OpenAITeacher) and c.labels == LABELS
    asyncio.run(c.close())


def test_make_client_unknown_provider_and_empty_ensemble():
    with pytest.raises(ValueError, match=r"^teacher x: unknown provider 'anthropic'$"):
        make_client(TeacherConfig(id=1, name="x", provider="anthropic"), labels=(), task_type="generation")
    with pytest.raises(ValueError, match=r"^ensemble e has no members$"):
        make_client(TeacherConfig(id=1, name="e", provider="ensemble"), labels=(), task_type="generation")


def test_make_client_refused_local_model():
    bad = TeacherConfig(id=1, name="loc", provider="transformers", model="../etc", policy=SecurityPolicy())
    with pytest.raises(RunStopped) as exc:
        make_client(bad, labels=(), task_type="generation")
    assert exc.value.reason == "refused" and str(exc.value).startswith("teacher loc: model: ")


class _Fixed:
    def __init__(self, reply, deterministic=False):
        self.reply, self.deterministic = reply, deterministic

    async def answer(self, messages, *, seed=None, temperature=None):
        return self.reply

    async def close(self):
        pass


def test_ensemble_all_members_fail():
    members = [_Fixed(TeacherReply(None, error="boom", error_kind="timeout", latency_ms=5.0, input_tokens=3)),
               _Fixed(TeacherReply(None, error="bang", error_kind="server_error", latency_ms=9.0))]
    r = asyncio.run(EnsembleTeacher(TeacherConfig(id=1, name="e", provider="ensemble"), members, LABELS,
                                    "classification").answer([]))
    assert (r.text, r.error, r.error_kind) == (None, "boom; bang", "timeout")
    assert r.latency_ms == 9.0 and r.input_tokens == 3


def test_ensemble_skips_failed_members_and_unmatched_text():
    members = [_Fixed(TeacherReply(None, error="boom", error_kind="timeout", cost_usd=0.5)),
               _Fixed(TeacherReply("pizza", "stop", cost_usd=0.25)),
               _Fixed(TeacherReply("Refund not showing up", "stop", cost_usd=0.25))]
    r = asyncio.run(EnsembleTeacher(TeacherConfig(id=1, name="e", provider="ensemble"), members, LABELS,
                                    "classification").answer([]))
    assert r.text == "refund_not_showing_up" and r.cost_usd == pytest.approx(1.0)
    assert r.extra_checks == [("ensemble", True, "majority vote of 1 member(s)")]


def test_ensemble_no_label_named_returns_first_text():
    members = [_Fixed(TeacherReply("pizza", "stop")), _Fixed(TeacherReply("pasta", "stop"))]
    r = asyncio.run(EnsembleTeacher(TeacherConfig(id=1, name="e", provider="ensemble"), members, LABELS,
                                    "classification").answer([]))
    assert (r.text, r.label_probs, r.extra_checks) == ("pizza", None, [])


def test_ensemble_pick_for_generation_and_deterministic():
    members = [_Fixed(TeacherReply("a", "stop"), True), _Fixed(TeacherReply("b", "length"), True)]
    e = EnsembleTeacher(TeacherConfig(id=1, name="e", provider="ensemble"), members, (), "generation")
    assert e.deterministic
    r = asyncio.run(e.answer([]))
    assert (r.text, r.extra_checks) == ("a", [("ensemble", True, "first member")])
    e.pick = lambda replies: (1, "picked the second")
    r = asyncio.run(e.answer([]))
    assert (r.text, r.finish_reason, r.extra_checks) == ("b", "length", [("ensemble", True, "picked the second")])
