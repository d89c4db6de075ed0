"""The gateway (gateway/), driven for real: uvicorn in a subprocess on the test database, the
`openai` client against it, loopback stubs as teacher and student upstreams."""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

# gateway.app calls django.setup(), which re-applies LOGGING (and so drops pytest's log capture
# handler): import it once at collection, before any test captures logs.
import gateway.app  # noqa: E402,F401
from tests.gateway_stub import StudentStub
from tests.openai_stub import StubServer

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
#: How long a test waits for the gateway (refreshing every 0.3 s, see the gateway_proc fixture)
#: to serve a key or a deployment change just saved: generous, for a loaded CI machine; the wait
#: ends as soon as /healthz shows it (gateway.readiness).
SERVED_WAIT_S = 120.0
#: The openai client's timeout for one request through the gateway: a cold model upstream on a
#: loaded machine can take tens of seconds (no retries: a retried request would be logged twice).
CLIENT_TIMEOUT_S = 300.0


def _teacher_answer(text: str) -> str:
    if "[other]" in text:
        return "refund_not_showing_up"
    if "[nolabel]" in text:
        return "I think it is about cards."
    return "card_arrival"


@pytest.fixture
def teacher_stub():
    s = StubServer(answer=_teacher_answer).start()
    yield s
    s.stop()


@pytest.fixture
def student_stub():
    s = StudentStub(answer=lambda text: "card_arrival").start()
    yield s
    s.stop()


def _served(gateway, key, dep=None, *, known=True):
    """Wait until the gateway knows ``key`` (``known=False``: no longer) and serves ``dep`` at its
    saved version (read again from the database)."""
    from gateway.readiness import wait_served

    if dep is not None:
        dep.refresh_from_db()
    wait_served(gateway.base_url, key, slug=dep.slug if dep is not None else None,
                version=dep.version if dep is not None else None, known=known, timeout_s=SERVED_WAIT_S)


def _setup(gateway, project, owner, teacher_stub, student_stub, **settings):
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create

    teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                             base_url=teacher_stub.base_url, api_key_env="OPENAI_API_KEY", price_in_per_1m=2,
                             price_out_per_1m=8, user=owner)
    dep = deployment_create(project=project, name="support-intents", teacher=teacher, user=owner,
                            student_url=student_stub.base_url, student_model="student-lm", **settings)
    _, raw = gateway_key_create(team=project.team, name="tests", user=owner)
    _served(gateway, raw, dep)
    return dep, raw


def _client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=CLIENT_TIMEOUT_S)


def _ask(client, text, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="support-intents", messages=[{"role": "user", "content": text}], **kw)
    return raw.headers["x-distillhub-route"], raw.parse()


def _wait_logs(dep, n, timeout=120.0, **filters):
    """The deployment's request logs once at least ``n`` are written (the gateway flushes every
    0.2 s; generous deadline for a loaded machine, ends as soon as they are there)."""
    from projects.models import RequestLog

    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = list(RequestLog.objects.filter(deployment=dep, **filters).order_by("id"))
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    pytest.fail(f"only {len(rows)} of {n} request logs {filters} arrived")


def test_routing_share_within_statistical_bounds_and_sticky_users(gateway, project, owner, teacher_stub, student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.3)
    client = _client(gateway, key)
    n = 400
    with ThreadPoolExecutor(16) as pool:
        routes = list(pool.map(lambda i: _ask(client, f"where is my card {i}")[0], range(n)))
    k = routes.count("student")
    # Binomial(400, 0.3): mean 120, sd 9.2; 4.5 sd either side fails once in ~150,000 runs.
    assert 79 <= k <= 161, k
    assert routes.count("teacher") == n - k
    # Sticky: one user always lands on the same side.
    for user in ("alice", "bob", "carol", "dave"):
        seen = {_ask(client, "hello", user=user)[0] for _ in range(6)}
        assert len(seen) == 1, (user, seen)
    # Every request is logged (batched), with its route.
    rows = _wait_logs(dep, n + 24)
    assert sum(r.route == "student" for r in rows[:n]) == k


def test_teacher_route_answers_with_project_prompt_and_logs_cost(gateway, project, owner, teacher_stub, student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    route, resp = _ask(_client(gateway, key), "my card has not arrived")
    assert route == "teacher"
    assert resp.choices[0].message.content == "card_arrival"
    assert resp.model == "support-intents"
    assert resp.usage.prompt_tokens == 20 and resp.usage.completion_tokens == 5
    [row] = _wait_logs(dep, 1)
    assert row.route == "teacher" and row.status == 200 and row.query == "my card has not arrived"
    assert row.cost_usd == pytest.approx((20 * 2 + 5 * 8) / 1e6)
    assert row.latency_ms > 0 and row.teacher_response == "card_arrival"


def test_low_confidence_student_answer_falls_back_to_teacher(gateway, project, owner, teacher_stub, student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=1.0, confidence_threshold=-0.5)
    client = _client(gateway, key)
    route, resp = _ask(client, "card arrived? [other]")
    assert route == "student" and resp.choices[0].message.content == "card_arrival"
    route, resp = _ask(client, "card arrived? [unsure] [other]")
    assert route == "fallback"
    assert resp.choices[0].message.content == "refund_not_showing_up"  # the teacher's answer
    rows = _wait_logs(dep, 2)
    assert [r.route for r in rows] == ["student", "fallback"]
    assert rows[0].confidence == pytest.approx(-0.05)
    assert rows[1].confidence == pytest.approx(-2.5) and "under" in rows[1].error
    assert student_stub.requests[-1]["logprobs"] is True


def test_failing_student_falls_back_and_failing_teacher_returns_its_error(gateway, project, owner, teacher_stub,
                                                                          student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=1.0)
    client = _client(gateway, key)
    route, resp = _ask(client, "card [boom]")
    assert route == "fallback" and resp.choices[0].message.content == "card_arrival"
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="support-intents", messages=[{"role": "user", "content": "x [boom] [quota]"}])
    assert exc.value.status_code == 429
    # A generic message to the client; the upstream's own words only in the request log.
    assert "teacher upstream failed (HTTP 429)" in exc.value.message
    assert "exceeded your current quota" not in exc.value.message
    rows = _wait_logs(dep, 2)
    assert rows[0].route == "fallback" and "student failed" in rows[0].error
    assert rows[1].status == 429 and "exceeded your current quota" in rows[1].error


def test_shadow_measures_live_agreement(gateway, project, owner, teacher_stub, student_stub):
    from projects.selectors_serving import deployment_live_figures

    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=1.0, shadow_share=1.0,
                      promote_window=10, alert_window=10, alert_agreement=0.9)
    client = _client(gateway, key)
    for i in range(10):
        route, resp = _ask(client, f"q{i}" + (" [other]" if i < 3 else ""))
        assert route == "student" and resp.choices[0].message.content == "card_arrival"
    rows = _wait_logs(dep, 10, route="shadow")
    assert sum(r.agreed for r in rows) == 7
    live = deployment_live_figures(deployment=dep)
    assert live["agreement"] == pytest.approx(0.7) and live["agreement_n"] == 10
    assert live["quality_delta"] == pytest.approx(0.3)
    assert live["alert"]["firing"] is True
    assert live["promote"]["ready"] is False


def test_streaming_sse(gateway, project, owner, teacher_stub, student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    client = _client(gateway, key)
    teacher_stub.answer = lambda text: "A longer teacher answer that comes in several pieces."
    stream = client.chat.completions.create(model="support-intents", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == "A longer teacher answer that comes in several pieces."
    assert len([p for p in parts if p]) == 9  # the teacher's own chunks, one per word, passed through
    assert finish == "stop" and usage.prompt_tokens == 20 and usage.total_tokens == 29
    [row] = _wait_logs(dep, 1)
    assert row.stream is True and row.route == "teacher" and row.status == 200
    assert row.teacher_response == "A longer teacher answer that comes in several pieces."
    assert (row.input_tokens, row.output_tokens) == (20, 9)
    assert row.cost_usd == pytest.approx((20 * 2 + 9 * 8) / 1e6)
    assert teacher_stub.bodies[-1]["stream"] is True
    assert teacher_stub.bodies[-1]["stream_options"] == {"include_usage": True}


def test_teacher_stream_reaches_the_client_before_the_upstream_finished(gateway, project, owner, teacher_stub,
                                                                         student_stub):
    """The stub holds its last word until the client has seen the first ones: a gateway that
    buffered the answer would get nothing to the client, and the stub would give up waiting."""
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=1.0, confidence_threshold=-0.5)
    client = _client(gateway, key)
    teacher_stub.answer = lambda text: "the teacher answers word by word"
    for text, route in (("hi", "student"), ("hi [unsure]", "fallback")):
        teacher_stub.stream_gate, teacher_stub.gate_opened = threading.Event(), None
        raw = client.chat.completions.with_raw_response.create(
            model="support-intents", messages=[{"role": "user", "content": text}], stream=True)
        assert raw.headers["x-distillhub-route"] == route
        parts = []
        for chunk in raw.parse():
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                    teacher_stub.stream_gate.set()
        if route == "student":  # buffered: the student's confidence is judged before anything is sent
            assert "".join(parts) == "card_arrival" and teacher_stub.gate_opened is None
        else:
            assert "".join(parts) == "the teacher answers word by word"
            assert teacher_stub.gate_opened is True
    rows = _wait_logs(dep, 2)
    assert [(r.route, r.stream) for r in rows] == [("student", True), ("fallback", True)]
    fb = rows[1]
    assert fb.teacher_response == "the teacher answers word by word" and fb.output_tokens == 6
    assert fb.confidence == pytest.approx(-2.5) and fb.agreed is False
    # The student's tokens (7 in, 2 out at its price 0) plus the teacher's (20 in, 6 out).
    assert fb.cost_usd == pytest.approx((20 * 2 + 6 * 8) / 1e6)


def test_transient_teacher_errors_are_retried_and_others_are_not(gateway, project, owner, teacher_stub,
                                                                  student_stub):
    """GATEWAY_TEACHER_RETRIES is 2 (the default): a 503 or a 429 (after its Retry-After: 1) then
    an answer gives 200; a persistent 500 is answered with the upstream's 500 after 3 tries; a 400
    and an insufficient_quota 429 are tried once. The stub counts the tries per query."""
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    client = _client(gateway, key)
    assert _ask(client, "card [503]")[1].choices[0].message.content == "card_arrival"
    assert teacher_stub.attempts["card [503]"] == 2
    assert _ask(client, "card [429]")[1].choices[0].message.content == "card_arrival"
    assert teacher_stub.attempts["card [429]"] == 2
    with pytest.raises(openai.InternalServerError) as exc:
        _ask(client, "card [500x]")
    assert exc.value.status_code == 500 and "teacher upstream failed (HTTP 500)" in exc.value.message
    assert teacher_stub.attempts["card [500x]"] == 3
    with pytest.raises(openai.BadRequestError) as exc:
        _ask(client, "card [400]")
    assert exc.value.status_code == 400 and "teacher upstream failed (HTTP 400)" in exc.value.message
    assert teacher_stub.attempts["card [400]"] == 1
    with pytest.raises(openai.RateLimitError):
        _ask(client, "card [quota]")
    assert teacher_stub.attempts["card [quota]"] == 1
    # A stream is retried only before it starts: a 503 first, then the stream.
    stream = client.chat.completions.create(model="support-intents", stream=True,
                                            messages=[{"role": "user", "content": "stream [503]"}])
    assert "".join(c.delta.content or "" for chunk in stream for c in chunk.choices) == "card_arrival"
    assert teacher_stub.attempts["stream [503]"] == 2
    rows = {r.query: r for r in _wait_logs(dep, 6)}
    assert rows["card [503]"].status == 200 and rows["stream [503]"].status == 200
    assert rows["card [500x]"].status == 500 and "upstream is down (after 3 tries)" in rows["card [500x]"].error
    assert rows["card [400]"].status == 400 and "tries" not in rows["card [400]"].error


def test_a_teacher_stream_cut_off_midway_ends_with_an_error_event_and_is_logged(gateway, project, owner,
                                                                                teacher_stub, student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    teacher_stub.answer = lambda text: "one two three four"
    stream = _client(gateway, key).chat.completions.create(
        model="support-intents", stream=True, messages=[{"role": "user", "content": "hi [cut]"}])
    parts = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == "one two"  # what arrived before the cut was passed on
    assert "stream broke" in exc.value.message
    assert teacher_stub.attempts["hi [cut]"] == 1  # never retried once the stream started
    [row] = _wait_logs(dep, 1)
    assert row.stream is True and row.response == "one two" and row.output_tokens == 2
    assert "stream broke after 2 chunks" in row.error and "without a finish reason" in row.error
    assert row.finish_reason == "error"


def test_a_client_leaving_a_teacher_stream_is_logged_with_what_it_got(gateway, project, owner, teacher_stub,
                                                                       student_stub):
    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    teacher_stub.answer = lambda text: "one two three"
    teacher_stub.stream_gate = threading.Event()
    stream = _client(gateway, key).chat.completions.create(
        model="support-intents", stream=True, messages=[{"role": "user", "content": "hi"}])
    for chunk in stream:
        if any(c.delta.content for c in chunk.choices):
            break
    stream.close()  # while the teacher still holds its last word (the gate is never opened)
    [row] = _wait_logs(dep, 1)
    assert row.stream is True and row.status == 200 and row.response.startswith("one")
    assert "the client disconnected after" in row.error and row.finish_reason == "disconnected"


def test_retry_policy_waits_for_retry_after_up_to_its_cap_and_backs_off_otherwise():
    import random

    from gateway.upstream import RetryPolicy, UpstreamError

    p = RetryPolicy(retries=2, backoff_s=0.25, retry_after_max_s=5.0)
    limited = UpstreamError("x", status=429, code="rate_limit_exceeded", headers={"Retry-After": "3"})
    assert p.delay(0, limited) == 3.0 and p.delay(1, limited) == 3.0 and p.delay(2, limited) is None
    too_long = UpstreamError("x", status=429, code="rate_limit_exceeded", headers={"Retry-After": "60"})
    assert p.delay(0, too_long) is None  # answered at once, with its Retry-After
    down = UpstreamError("x", status=502, code="upstream_unreachable")
    rng = random.Random(0)
    waits = [p.delay(n, down, rng) for n in (0, 1)]
    assert 0.125 <= waits[0] < 0.25 and 0.25 <= waits[1] < 0.5
    for status, code in ((400, None), (404, None), (429, "insufficient_quota"), (502, "upstream_bad_response")):
        assert p.delay(0, UpstreamError("x", status=status, code=code)) is None, (status, code)
    assert p.delay(0, UpstreamError("x", status=504, code="upstream_timeout")) is not None


def test_key_revocation_and_bad_keys(gateway, project, owner, teacher_stub, student_stub):
    from projects.models import GatewayKey
    from projects.services.deployments import gateway_key_revoke

    dep, key = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    client = _client(gateway, key)
    assert [m.id for m in client.models.list().data] == ["support-intents"]
    assert _ask(client, "hi")[0] == "teacher"
    gateway_key_revoke(key=GatewayKey.objects.get(team=project.team), user=owner)
    _served(gateway, key, known=False)
    with pytest.raises(openai.AuthenticationError):
        _ask(client, "hi")
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(gateway, "dh-not-a-key"), "hi")
    # Only the hash is stored.
    row = GatewayKey.objects.get(team=project.team)
    assert key not in (row.key_hash, row.prefix) and key.startswith(row.prefix)


def test_a_teams_key_never_reaches_another_teams_deployment(gateway, project, owner, other_team, outsider,
                                                             teacher_stub, student_stub):
    from projects.services.deployments import gateway_key_create

    dep, _ = _setup(gateway, project, owner, teacher_stub, student_stub, student_share=0.0)
    _, their_key = gateway_key_create(team=other_team, name="theirs", user=outsider)
    _served(gateway, their_key)
    client = _client(gateway, their_key)
    with pytest.raises(openai.NotFoundError) as exc:
        _ask(client, "hi")
    assert exc.value.code == "model_not_found"
    assert client.models.list().data == []
    assert teacher_stub.total_completed == 0



@pytest.fixture(scope="session")
def classifier_folder():
    """A real MiniLM sequence classifier over LABELS (a random head: real inference, unsure
    answers) under MEDIA_ROOT; built once."""
    import os
    from pathlib import Path

    import torch
    from django.conf import settings
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.pipeline.registry import MINILM, resolve_model

    clf = Path(settings.MEDIA_ROOT) / "test-gateway-artifacts" / "classifier"
    if not (clf / "config.json").exists():
        torch.manual_seed(0)
        src = resolve_model(MINILM)
        m = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
        tmp = clf.with_name("classifier.tmp")
        m.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        os.replace(tmp, clf)
    return clf


def test_real_classifier_student_in_the_gateway(gateway, project, owner, teacher_stub, classifier_folder):
    from django.conf import settings

    from projects.models import ModelArtifact, TrainingRun
    from projects.services.deployments import deployment_create, deployment_update, gateway_key_create
    from projects.services.generation import teacher_create

    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6", status="succeeded")
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                       path=str(classifier_folder.relative_to(settings.MEDIA_ROOT)))
    teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                             base_url=teacher_stub.base_url, user=owner)
    dep = deployment_create(project=project, name="support-intents", teacher=teacher, user=owner, student_artifact=art,
                            student_share=1.0)
    _, key = gateway_key_create(team=project.team, name="tests", user=owner)
    _served(gateway, key, dep)
    client = _client(gateway, key)
    route, resp = _ask(client, "My card still has not arrived after two weeks.")
    assert route == "student" and resp.choices[0].message.content in LABELS
    assert resp.usage.prompt_tokens > 5
    [row] = _wait_logs(dep, 1)
    assert 1 / 3 <= row.confidence <= 1.0
    # A threshold above what the (untrained) student can reach: the teacher answers.
    deployment_update(deployment=dep, user=owner, confidence_threshold=0.99)
    _served(gateway, key, dep)
    route, resp = _ask(client, "I lost my card yesterday.")
    assert route == "fallback" and resp.choices[0].message.content == "card_arrival"
    rows = _wait_logs(dep, 2)
    assert rows[1].route == "fallback" and rows[1].confidence < 0.99


# --- Hostile settings and requests, against the gateway app in this process ----------------------
# (Starlette's TestClient runs the real app, its snapshot loader and its log buffer here, so a test
# can change the operator's settings with the `settings` fixture; the rows must be committed, as
# the snapshot is read from another thread.)


class _Internal:
    """A loopback 'internal service' that answers every POST with 403 and a secret body, and
    records the path and Authorization header it was sent."""

    SECRET = b'{"secret":"INTERNAL-ONLY-DATA"}'

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.seen.append((self.path, self.headers.get("authorization")))
                self.send_response(403)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.SECRET)))
                self.end_headers()
                self.wfile.write(outer.SECRET)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def internal():
    s = _Internal()
    yield s
    s.stop()


@contextlib.contextmanager
def _in_process(**kw):
    import gc

    from starlette.testclient import TestClient

    import gateway.app as G

    with TestClient(G.app, raise_server_exceptions=False, **kw) as c:
        yield c
    # The app's worker threads have ended; collect their database connections now so the test
    # database can be dropped at the end of the session.
    gc.collect()


def _post(c, key, body, **kw):
    return c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, **kw)


def _hi(model):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.django_db(transaction=True)
def test_gateway_preloads_a_new_classifier_student_before_its_first_request(project, owner, teacher_stub,
                                                                            classifier_folder):
    """On each refresh the gateway loads (and runs once) the classifier students of deployments
    it has not seen, in the background, so the first request routed to one does not load it."""
    from django.conf import settings

    import gateway.app as G
    from gateway import upstream
    from projects.models import ModelArtifact, TrainingRun
    from projects.services.deployments import deployment_create
    from projects.services.generation import teacher_create

    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6", status="succeeded")
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                       path=str(classifier_folder.relative_to(settings.MEDIA_ROOT)))
    teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                             base_url=teacher_stub.base_url, user=owner)
    deployment_create(project=project, name="support-intents", teacher=teacher, user=owner, student_artifact=art,
                      student_share=1.0)
    path = str(classifier_folder.resolve())
    upstream._CLASSIFIERS.pop(path, None)
    with _in_process():
        assert path in G.GW.warming
        deadline = time.time() + 120
        while path not in upstream._CLASSIFIERS:
            assert time.time() < deadline, "the classifier student was not preloaded"
            time.sleep(0.1)
    G.GW.warming.discard(path)


@pytest.mark.django_db(transaction=True)
def test_upstream_error_bodies_are_never_echoed_to_clients(project, owner, internal):
    from projects.models import RequestLog
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create

    t = teacher_create(project=project, name="api", provider="openai", model="gpt",
                       base_url=f"http://127.0.0.1:{internal.port}/v1", user=owner)
    dep = deployment_create(project=project, name="dep-a", teacher=t, user=owner,
                            student_url=f"http://127.0.0.1:{internal.port}/v1", student_model="x", student_share=0.0)
    _, key = gateway_key_create(team=project.team, name="k", user=owner)
    with _in_process() as c:
        r = _post(c, key, _hi("dep-a"))
    assert r.status_code == 403
    assert "INTERNAL-ONLY-DATA" not in r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and err["code"] == "upstream_error"
    assert err["message"].startswith("The teacher upstream failed (HTTP 403)")
    [row] = RequestLog.objects.filter(deployment=dep)
    assert row.status == 403 and "INTERNAL-ONLY-DATA" in row.error  # the detail stays in the log


@pytest.mark.django_db(transaction=True)
def test_gateway_refuses_routes_to_internal_addresses_and_unlisted_key_variables(project, owner, internal, settings,
                                                                                 monkeypatch, caplog):
    """Rows that bypassed the save-time checks (admin edits, older rows, a changed policy) are
    checked again when the gateway loads them: the route is left out, with the reason logged, and
    nothing is sent to the address or with the variable."""
    from projects.models import Deployment, Teacher
    from projects.services.deployments import gateway_key_create

    settings.ALLOW_PRIVATE_TEACHER_URLS = False
    url = f"http://127.0.0.1:{internal.port}"
    monkeypatch.setenv("DATABASE_PASSWORD_FOR_TEST", "s3cr3t-db-password")
    local = Teacher.objects.create(project=project, name="local", provider="transformers", model="m")
    legacy = Teacher.objects.create(project=project, name="legacy", provider="openai", model="gpt",
                                    base_url="http://8.8.8.8/v1", api_key_env="DATABASE_PASSWORD_FOR_TEST")
    public = Teacher.objects.create(project=project, name="public", provider="openai", model="gpt",
                                    base_url="http://8.8.8.8/v1")
    Deployment.objects.create(project=project, name="ssrf", slug="ssrf", teacher=local, teacher_url=url,
                              student_url="http://8.8.4.4/v1", student_model="x", student_share=0.0)
    Deployment.objects.create(project=project, name="meta", slug="meta", teacher=public,
                              student_url="http://169.254.169.254/latest", student_model="x", student_share=1.0)
    Deployment.objects.create(project=project, name="legacy", slug="legacy", teacher=legacy,
                              student_url="http://8.8.4.4/v1", student_model="x", student_share=0.0)
    _, key = gateway_key_create(team=project.team, name="k", user=owner)
    with caplog.at_level("WARNING", logger="gateway"), _in_process() as c:
        for slug in ("ssrf", "meta", "legacy"):
            r = _post(c, key, _hi(slug))
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (slug, r.text)
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"] == []
    assert internal.seen == []
    logged = caplog.text
    assert "deployment ssrf" in logged and "teacher_url: 127.0.0.1 is a loopback address" in logged
    assert "deployment meta" in logged and "student_url: 169.254.169.254 is a link-local address" in logged
    assert "deployment legacy" in logged and "api_key_env: DATABASE_PASSWORD_FOR_TEST is not one of" in logged
    assert "s3cr3t" not in logged


@pytest.mark.django_db(transaction=True)
def test_malformed_requests_get_a_400_naming_the_field(project, owner, internal, monkeypatch):
    """Hostile bodies answer 400 (or 413) with an OpenAI-style error, never a 500, and reach no
    upstream."""
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create

    t = teacher_create(project=project, name="api", provider="openai", model="gpt",
                       base_url=f"http://127.0.0.1:{internal.port}/v1", user=owner)
    deployment_create(project=project, name="dep-a", teacher=t, user=owner,
                      student_url=f"http://127.0.0.1:{internal.port}/v1", student_model="x", student_share=0.0)
    _, key = gateway_key_create(team=project.team, name="k", user=owner)
    h = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    hi = [{"role": "user", "content": "hi"}]
    monkeypatch.setattr(gateway.app.GW, "max_body_bytes", 100_000)
    with _in_process() as c:
        def err(r, status):
            assert r.status_code == status, r.text
            return r.json()["error"]

        e = err(c.post("/v1/chat/completions", headers=h, content=b"[" * 50_000 + b"]" * 50_000), 400)
        assert e["code"] == "invalid_json" and "levels deep" in e["message"]
        e = err(_post(c, key, {"model": "dep-a", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
                400)
        assert e["param"] == "messages" and e["code"] == "invalid_messages"
        e = err(_post(c, key, {"model": "dep-a", "stream": True, "stream_options": "yes", "messages": hi}), 400)
        assert e["param"] == "stream_options" and e["message"].startswith("stream_options:")
        e = err(_post(c, key, {"model": "dep-a", "stream": "no", "messages": hi}), 400)
        assert e["param"] == "stream"
        e = err(_post(c, key, {"model": "dep-a", "max_tokens": True, "messages": hi}), 400)
        assert e["param"] == "max_tokens" and e["message"].startswith("max_tokens: must be a whole number")
        e = err(_post(c, key, {"model": "dep-a", "max_tokens": 10 ** 40, "messages": hi}), 400)
        assert e["param"] == "max_tokens"
        e = err(_post(c, key, {"model": "dep-a", "max_completion_tokens": 0, "messages": hi}), 400)
        assert e["param"] == "max_completion_tokens"
        big = b'{"model":"dep-a","messages":[{"role":"user","content":"' + b"a" * 200_000 + b'"}]}'
        e = err(c.post("/v1/chat/completions", headers=h, content=big), 413)
        assert e["code"] == "request_too_large" and "100000 bytes" in e["message"]

        def chunked():  # no Content-Length: the limit counts the bytes as they arrive
            for i in range(0, len(big), 10_000):
                yield big[i:i + 10_000]

        e = err(c.post("/v1/chat/completions", headers=h, content=chunked()), 413)
        assert e["code"] == "request_too_large"
    assert internal.seen == []


@pytest.mark.django_db(transaction=True)
def test_healthz_says_ok_and_shows_only_the_keys_team(project, owner, other_team, outsider):
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create

    t = teacher_create(project=project, name="api", provider="openai", model="gpt", base_url="http://8.8.8.8/v1",
                       user=owner)
    deployment_create(project=project, name="dep-a", teacher=t, user=owner, student_url="http://8.8.4.4/v1",
                      student_model="x")
    deployment_create(project=project, name="dep-b", teacher=t, user=owner, student_url="http://8.8.4.4/v1",
                      student_model="x")
    _, key = gateway_key_create(team=project.team, name="k", user=owner)
    theirs = project_create(team=other_team, user=outsider, name="B", task_type="classification", labels=["a", "b"])
    _, their_key = gateway_key_create(team=other_team, name="k", user=outsider)
    with _in_process() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/healthz", headers={"Authorization": "Bearer dh-wrong"}).json() == {"status": "ok"}
        mine = c.get("/healthz", headers={"Authorization": f"Bearer {key}"}).json()
        assert mine["status"] == "ok" and mine["deployments"] == 2 and "keys" not in mine
        assert mine["versions"] == {"dep-a": 1, "dep-b": 1}
        theirs_h = c.get("/healthz", headers={"Authorization": f"Bearer {their_key}"}).json()
        assert theirs_h["deployments"] == 0 and theirs_h["versions"] == {}
    assert theirs.team_id == other_team.pk


def test_student_timeout_comes_from_the_environment(monkeypatch):
    """GATEWAY_STUDENT_TIMEOUT_S: seconds a student may take (default 60); a value that is not a
    positive number stops the gateway with a message naming the variable."""
    from gateway.state import student_timeout_s

    monkeypatch.delenv("GATEWAY_STUDENT_TIMEOUT_S", raising=False)
    assert student_timeout_s() == 60.0
    monkeypatch.setenv("GATEWAY_STUDENT_TIMEOUT_S", "600")
    assert student_timeout_s() == 600.0
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv("GATEWAY_STUDENT_TIMEOUT_S", bad)
        with pytest.raises(SystemExit, match=f"GATEWAY_STUDENT_TIMEOUT_S='{bad}' is not a positive number"):
            student_timeout_s()


@pytest.mark.django_db(transaction=True)
def test_log_rows_of_a_deleted_deployment_are_dropped_not_retried_forever(project, owner, teacher_stub, student_stub):
    """A deployment deleted while its request logs wait in the buffer: those rows are dropped and
    counted; the others are written, and later flushes work (kept, the rows would fail every
    flush after and stop all request logging)."""
    import asyncio

    from gateway.logbuffer import LogBuffer
    from projects.models import RequestLog
    from projects.services.deployments import deployment_create
    from projects.services.generation import teacher_create

    teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                             base_url=teacher_stub.base_url, user=owner)
    dep = deployment_create(project=project, name="kept", teacher=teacher, user=owner, student_url=student_stub.base_url, student_model="s")
    gone = deployment_create(project=project, name="gone", teacher=teacher, user=owner,
                             student_url=student_stub.base_url, student_model="s")
    buf = LogBuffer()
    for d, q in [(dep, "a"), (gone, "b"), (dep, "c")]:
        buf.add(deployment_id=d.pk, version=1, route="teacher", status=200, query=q)
    gone.delete()
    assert asyncio.run(buf.flush()) == 2
    assert (buf.rows, buf.dropped, buf.written) == ([], 1, 2)
    buf.add(deployment_id=dep.pk, version=1, route="teacher", status=200, query="d")
    assert asyncio.run(buf.flush()) == 1
    assert list(RequestLog.objects.filter(deployment=dep).order_by("id").values_list("query", flat=True)) == [
        "a", "c", "d"]


@pytest.mark.django_db(transaction=True)
def test_gateway_refuses_a_student_artifact_outside_the_media_folder(project, owner, caplog):
    from projects.models import Deployment, ModelArtifact, Teacher
    from projects.services.deployments import gateway_key_create

    t = Teacher.objects.create(project=project, name="api", provider="openai", model="gpt", base_url="http://8.8.8.8/v1")
    art = ModelArtifact.objects.create(project=project, kind="classifier", path="../../../../etc")
    Deployment.objects.create(project=project, name="esc", slug="esc", teacher=t, student_artifact=art, student_share=1.0)
    _, key = gateway_key_create(team=project.team, name="k", user=owner)
    with caplog.at_level("WARNING", logger="gateway"), _in_process() as c:
        assert _post(c, key, _hi("esc")).status_code == 404
    assert f"student_artifact: artifact {art.pk}: its path leaves the media folder" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_two_teams_may_use_the_same_slug_and_each_key_reaches_its_own(project, owner, other_team, outsider,
                                                                       teacher_stub):
    from projects.models import RequestLog
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create

    pb = project_create(team=other_team, user=outsider, name="B", task_type="classification", labels=LABELS)
    deps = {}
    for p, user in ((project, owner), (pb, outsider)):
        t = teacher_create(project=p, name="gpt", provider="openai", model="stub-teacher",
                           base_url=teacher_stub.base_url, user=user)
        deps[p.team_id] = deployment_create(project=p, name="support-intents", teacher=t, user=user,
                                            student_url="http://127.0.0.1:9/v1", student_model="x", student_share=0.0)
    _, mine = gateway_key_create(team=project.team, name="k", user=owner)
    _, theirs = gateway_key_create(team=other_team, name="k", user=outsider)
    with _in_process() as c:
        for key in (mine, theirs, theirs):
            assert _post(c, key, _hi("support-intents")).status_code == 200
        assert [m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {mine}"}).json()["data"]] == [
            "support-intents"]
    assert RequestLog.objects.filter(deployment=deps[project.team_id]).count() == 1
    assert RequestLog.objects.filter(deployment=deps[other_team.pk]).count() == 2


# --- A causal-LM student served by `serve-student` (the bundled SmolLM2) ----------------------------


@pytest.fixture
def smollm_server(project, owner):
    """`serve-student --teacher` on the bundled SmolLM2 (what `distill serve-student` loads:
    ``serve_target`` + ``Model`` + ``build_app``), served by uvicorn in a thread of this process."""
    import uvicorn

    from gateway.student import Model, build_app, serve_target
    from projects.services.generation import teacher_create
    from tests.conftest import free_port

    # timeout_s: how long the gateway waits for this teacher; scoring the labels over the long
    # teacher prompt can take minutes on a loaded CI machine (the default 60 s gave a 504).
    teacher_create(project=project, name="smol", provider="transformers", model="smollm2-135m-instruct", user=owner,
                   timeout_s=600)
    model = Model(serve_target(teacher=f"{project.slug}:smol"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(model), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 120
    while not server.started:
        assert t.is_alive(), "the student server stopped while starting"
        assert time.time() < deadline, "the student server did not start"
        time.sleep(0.05)
    server.base_url = f"http://127.0.0.1:{port}/v1"
    server.model_name = model.target.name
    yield server
    server.should_exit = True
    t.join(timeout=10)


def test_causal_lm_student_confidence_is_its_mean_token_logprob(gateway, project, owner, teacher_stub, smollm_server):
    import math

    from projects.services.deployments import deployment_create, deployment_update, gateway_key_create
    from projects.services.generation import teacher_create

    # The served answer carries its mean token log-probability, and the per-token ones on request.
    direct = openai.OpenAI(base_url=smollm_server.base_url, api_key="none", max_retries=0,
                           timeout=CLIENT_TIMEOUT_S)
    raw = direct.chat.completions.with_raw_response.create(
        model=smollm_server.model_name, max_tokens=12, logprobs=True,
        messages=[{"role": "user", "content": "My card still has not arrived."}])
    body = raw.http_response.json()
    conf = body["distillhub"]["confidence"]
    lps = [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]]
    assert body["choices"][0]["message"]["content"].strip()
    assert math.isfinite(conf) and conf < 0 and lps and all(lp <= 0 for lp in lps)
    assert conf == pytest.approx(sum(lps) / len(lps))

    teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                             base_url=teacher_stub.base_url, user=owner)
    dep = deployment_create(project=project, name="support-intents", teacher=teacher, user=owner,
                            student_url=smollm_server.base_url, student_model=smollm_server.model_name,
                            student_share=1.0, confidence_threshold=-50.0)
    _, key = gateway_key_create(team=project.team, name="tests", user=owner)
    _served(gateway, key, dep)
    client = _client(gateway, key)
    # A low threshold: the student's answer stands.
    route, resp = _ask(client, "My card still has not arrived.", max_tokens=12)
    assert route == "student" and resp.choices[0].message.content.strip()
    [row] = _wait_logs(dep, 1)
    assert row.route == "student" and math.isfinite(row.confidence) and -50.0 < row.confidence < 0
    # A threshold no sampled answer reaches (mean log p of 0 means certainty): the teacher answers.
    deployment_update(deployment=dep, user=owner, confidence_threshold=-1e-9)
    _served(gateway, key, dep)
    route, resp = _ask(client, "I lost my card yesterday.", max_tokens=12)
    assert route == "fallback" and resp.choices[0].message.content == "card_arrival"
    rows = _wait_logs(dep, 2)
    assert rows[1].route == "fallback" and math.isfinite(rows[1].confidence) and rows[1].confidence < -1e-9
    assert teacher_stub.total_completed == 1


def test_served_local_teacher_answers_a_label_and_its_answers_are_harvested_as_accepted(gateway, project, owner,
                                                                                       smollm_server,
                                                                                       classifier_folder):
    """A local (transformers) teacher behind `serve-student --teacher` in a classification
    project scores the labels, as generation's local teacher does, so the teacher answers that
    the gateway logs pass the label check when harvested (free text failed it)."""
    from django.conf import settings

    from projects.models import ModelArtifact, Sample, Teacher, TrainingRun
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.serving_loop import deployment_harvest

    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6", status="succeeded")
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                       path=str(classifier_folder.relative_to(settings.MEDIA_ROOT)))
    teacher = Teacher.objects.get(project=project, name="smol")
    dep = deployment_create(project=project, name="support-intents", teacher=teacher, user=owner,
                            teacher_url=smollm_server.base_url, student_artifact=art, student_share=0.0)
    _, key = gateway_key_create(team=project.team, name="tests", user=owner)
    _served(gateway, key, dep)
    client = _client(gateway, key)
    queries = ["My card still has not arrived.", "Someone stole my card.", "My refund is not on my account."]
    for q in queries:
        route, resp = _ask(client, q)
        assert route == "teacher" and resp.choices[0].message.content in LABELS
    rows = _wait_logs(dep, 3)
    assert all(r.teacher_response in LABELS for r in rows)
    res = deployment_harvest(deployment=dep, user=owner)
    assert res["requests"] == 3 and res["accepted"] == 3 and res["rejected"] == 0
    samples = Sample.objects.filter(run_id=res["run"]).order_by("id")
    assert [s.parsed for s in samples] == [r.teacher_response for r in rows]
    assert all(s.failed_checks == [] for s in samples)
    # The teacher got the project's task prompt: the labels are in its system message.
    assert "refund_not_showing_up" in samples[0].prompt[0]["content"]


def test_demo_serve_deploys_the_demo_classifier_and_answers_through_the_gateway(gateway, teacher_stub,
                                                                                  classifier_folder, capsys):
    """The last step of `make demo` (`distill demo-serve`), against the real gateway: the demo
    project's classifier student deployed, six requests answered with their routes."""
    import json

    from django.conf import settings
    from django.core.management import call_command

    from collections import Counter

    from gateway.upstream import classify_text
    from projects.cli.demo_loop import DEMO_PROJECT, DEMO_TEAM, DEMO_TEAM_SLUG
    from projects.cli.demo_serving import DEMO_QUERIES
    from projects.models import ModelArtifact, Project, Query, RequestLog, Sample, Team, TrainingRun
    from workers.pipeline.ingest import clean_text, text_hash
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create
    from projects.services.teams import team_create

    team = Team.objects.filter(slug=DEMO_TEAM_SLUG).first() or team_create(name=DEMO_TEAM)
    project = project_create(team=team, name=DEMO_PROJECT, task_type="classification", labels=LABELS)
    teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher", base_url=teacher_stub.base_url)
    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6", status="succeeded")
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                       path=str(classifier_folder.relative_to(settings.MEDIA_ROOT)))
    # Validation queries: the demo derives its confidence threshold from them.
    val = ["Is my card on its way?", "My wallet was stolen", "Refund missing", "The card never came",
           "I misplaced my card", "Shop refund not received", "Where is my card?"]
    for t in val:
        Query.objects.create(project=project, text=t, text_hash=text_hash(clean_text(t)), split="validation")
    call_command("distill", "demo-serve", "--gateway-url", gateway.base_url, "--json")
    printed = capsys.readouterr().out.strip().splitlines()
    res = json.loads(printed[-1])
    n = len(DEMO_QUERIES)
    assert sum(line.startswith("  [") for line in printed) == n  # each request with its route
    assert res["deployment"] == "support-intents-demo" and len(res["answers"]) == n
    # The threshold is the median top-label probability over the validation queries.
    confs = sorted(classify_text(str(classifier_folder), t).confidence for t in val)
    assert res["threshold"] == pytest.approx(confs[len(val) // 2], abs=1e-3) and 1 / 3 < res["threshold"] < 1
    assert any(f"validation queries" in line and f"{res['threshold']:g}" in line for line in printed)
    # Routes are mixed: some student answers stand, some fall back under the threshold.
    routes = res["routes"]
    assert routes.get("student", 0) >= 1 and routes.get("fallback", 0) >= 1, routes
    assert sum(routes.values()) == n and routes == dict(Counter(a["route"] for a in res["answers"]))
    assert any(line.startswith(f"Routes: {routes.get('student', 0)} answered by the student, "
                               f"{routes.get('fallback', 0)} fell back") for line in printed)
    assert all(a["answer"] in LABELS for a in res["answers"])
    dep = Project.objects.get(pk=project.pk).deployments.get()
    assert dep.student_artifact_id == art.pk and dep.confidence_threshold == res["threshold"]
    rows = [r for r in _wait_logs(dep, n) if r.route != "shadow"]
    assert Counter(r.route for r in rows[:n]) == Counter(routes)
    assert all(r.confidence < res["threshold"] for r in rows if r.route == "fallback")
    assert all(r.confidence >= res["threshold"] for r in rows if r.route == "student")
    assert RequestLog.objects.filter(deployment=dep, query__startswith="My new card").exclude(route="shadow").count() == 1
    # The logged teacher answers (teacher, fallback and any shadow routes) became accepted samples.
    h = res["harvest"]
    assert h["requests"] >= routes.get("fallback", 0) + routes.get("teacher", 0) and h["rejected"] == 0
    assert h["accepted"] == h["requests"] == Sample.objects.filter(run_id__in=h["runs"], status="accepted").count()
    harvested = set(Sample.objects.filter(run_id__in=h["runs"]).values_list("query__text", flat=True))
    assert {a["query"] for a in res["answers"] if a["route"] != "student"} <= harvested
