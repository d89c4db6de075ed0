"""The gateway's ASGI app: ``POST /v1/chat/completions`` (JSON or SSE streaming) and
``GET /v1/models`` in the OpenAI wire format, so the ``openai`` client works by changing
``base_url``; ``GET /healthz`` for probes. Run it with ``distill gateway`` or
``uvicorn gateway.app:app``.

Settings (environment): ``GATEWAY_REFRESH_S`` (default 2: how often keys and deployments are
reloaded), ``GATEWAY_FLUSH_S`` (default 1: request-log flush interval), ``GATEWAY_FLUSH_ROWS``
(default 1000), ``GATEWAY_BUFFER_MAX`` (default 100000 rows kept while Postgres is down),
``GATEWAY_MAX_BODY_BYTES`` (default 1000000: a larger request body gets 413),
``GATEWAY_TEACHER_RETRIES`` (default 2: more tries of a teacher call that failed transiently),
``GATEWAY_RETRY_BACKOFF_S`` (default 0.25: the first backoff, doubled each try),
``GATEWAY_RETRY_AFTER_MAX_S`` (default 5: the longest upstream Retry-After waited for),
``GATEWAY_STUDENT_TIMEOUT_S`` (default 60: seconds a student may take before the teacher
answers instead; a teacher's own timeout is its ``timeout_s`` setting), plus the usual ``DATABASE_URL`` and the teachers' API-key variables.

A request names a deployment by its slug as ``model``; the key must belong to the deployment's
team (otherwise: 404 ``model_not_found``, as for a model that does not exist). The last user
message is the query: the teacher gets it inside the project's teacher prompt (instructions,
labels, few-shot examples), the student inside its short student prompt, as in training.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")
django.setup()

import orjson  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route as HttpRoute  # noqa: E402

from gateway import routing  # noqa: E402
from gateway.logbuffer import LogBuffer  # noqa: E402
from gateway.state import Route, Snapshot, load_snapshot, student_timeout_s  # noqa: E402
from workers.pipeline.json_limits import MAX_DEPTH, JSONTooDeep, check_depth, loads_bounded  # noqa: E402
from gateway.upstream import (OWN_CODES, Reply, RetryPolicy, UpstreamError, UpstreamStream, chat,  # noqa: E402
                              dumps, make_client, open_stream, retrying)

log = logging.getLogger("gateway")
#: The largest max_tokens a client may ask for (more than any model here can answer).
MAX_TOKENS = 1_000_000


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise SystemExit(f"{name}={os.environ[name]!r} is not a number") from None


class Gateway:
    """Per-process state: the snapshot, the HTTP client, the log buffer, background tasks."""

    def __init__(self) -> None:
        self.snapshot = Snapshot(keys={}, routes={})
        self.refresh_s = _env_float("GATEWAY_REFRESH_S", 2.0)
        self.logs = LogBuffer(flush_s=_env_float("GATEWAY_FLUSH_S", 1.0),
                              flush_rows=int(_env_float("GATEWAY_FLUSH_ROWS", 1000)),
                              max_rows=int(_env_float("GATEWAY_BUFFER_MAX", 100_000)))
        self.client = None
        self.tasks: list[asyncio.Task] = []
        self.background: set[asyncio.Task] = set()
        self.refreshed_at = 0.0
        self.rng = random.Random()
        self.max_body_bytes = int(_env_float("GATEWAY_MAX_BODY_BYTES", 1_000_000))
        self.warming: set[str] = set()
        self.retry = RetryPolicy(retries=max(0, int(_env_float("GATEWAY_TEACHER_RETRIES", 2))),
                                 backoff_s=_env_float("GATEWAY_RETRY_BACKOFF_S", 0.25),
                                 retry_after_max_s=_env_float("GATEWAY_RETRY_AFTER_MAX_S", 5.0))
        student_timeout_s()  # a bad GATEWAY_STUDENT_TIMEOUT_S stops the gateway at start, naming it

    async def refresh(self) -> None:
        try:
            self.snapshot = await asyncio.to_thread(load_snapshot)
            self.refreshed_at = time.time()
        except Exception as exc:  # noqa: BLE001 - keep serving from the last snapshot
            log.warning("gateway refresh failed, serving the last snapshot: %s", exc)
            return
        self.warm_classifiers()

    def warm_classifiers(self) -> None:
        """Load the in-process classifier students of new deployments in the background (and
        answer once), so the first request routed to one does not wait seconds for the model to
        load. A folder that fails to load is not retried here; the requests report it."""
        for r in self.snapshot.routes.values():
            path = getattr(r.student, "artifact_path", None)
            if path and path not in self.warming:
                self.warming.add(path)
                self.spawn(self._warm(path))

    async def _warm(self, path: str) -> None:
        from gateway.upstream import classify_text

        try:  # one answer, not just the load: the first forward pass also sets up torch's kernels
            await asyncio.to_thread(classify_text, path, "warm-up")
        except Exception as exc:  # noqa: BLE001 - the request that needs it reports the error (no retry)
            log.warning("could not preload the classifier student at %s: %s", path, exc)

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    def spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self.background.add(t)
        t.add_done_callback(self.background.discard)


GW = Gateway()


def _error(status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def _read_body(request: Request) -> bytes | Response:
    """The request body, or a 413 error once it passes ``GATEWAY_MAX_BODY_BYTES`` (checked on
    Content-Length first, then on the bytes actually read: a chunked body has no length)."""
    limit = GW.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return _error(400, "Content-Length: not a number.", code="invalid_request")
        if int(declared) > limit:
            return _too_big(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _too_big(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_big(limit: int) -> Response:
    return _error(413, f"The request body is larger than {limit} bytes (GATEWAY_MAX_BODY_BYTES).",
                  code="request_too_large")


def _loads(raw: bytes):
    """The parsed body (orjson; on its failure ``loads_bounded`` says why: malformed or too deep).
    Raises ValueError / JSONTooDeep."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return loads_bounded(raw)
    check_depth(value)
    return value


def _auth(request: Request):
    """(key id, team id) for the request's bearer key, or None."""
    h = request.headers.get("authorization", "")
    if not h.lower().startswith("bearer "):
        return None
    raw = h[7:].strip()
    return GW.snapshot.keys.get(hashlib.sha256(raw.encode()).hexdigest())


async def models(request: Request) -> Response:
    who = _auth(request)
    if who is None:
        return _error(401, "Invalid or revoked API key (send Authorization: Bearer <key>).", code="invalid_api_key")
    data = [{"id": r.slug, "object": "model", "created": r.created, "owned_by": "distillhub"}
            for r in GW.snapshot.routes.values() if r.team_id == who[1]]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    """``{"status": "ok"}`` for probes. With a valid key also the key's team's deployment count,
    the version of each of its deployments the gateway serves now (``versions``: slug -> version,
    so a script can wait until a change it saved is in effect) and the gateway's health (last
    refresh, Unix seconds; request-log rows waiting for Postgres and dropped); never other
    teams' deployments or traffic."""
    who = _auth(request)
    if who is None:
        return JSONResponse({"status": "ok"})
    mine = [r for r in GW.snapshot.routes.values() if r.team_id == who[1]]
    return JSONResponse({"status": "ok", "deployments": len(mine), "versions": {r.slug: r.version for r in mine},
                         "refreshed_at": GW.refreshed_at, "log_buffered": len(GW.logs.rows),
                         "log_dropped": GW.logs.dropped})


def _messages_for(route, query: str, who: str) -> list[dict]:
    """The chat messages for ``who`` (teacher or student): the route's fixed prompt part (built
    once per snapshot) and the query, as in training (``workers.pipeline.prompts``)."""
    if who == "teacher":
        return [*route.teacher_prefix, {"role": "user", "content": query}]
    return [{"role": "user", "content": route.student_prefix + query}]


async def _shadow(route, query: str, student: Reply, key_id: int) -> None:
    """Ask the teacher too and log whether it agrees with the student's answer (not awaited by
    the request)."""
    try:
        t = await chat(GW.client, route.teacher, _messages_for(route, query, "teacher"))
    except UpstreamError as exc:
        GW.logs.add(deployment_id=route.id, key_id=key_id, version=route.version, route="shadow", status=exc.status,
                    query=query, response=student.text, error=str(exc)[:2000])
        return
    agreed = routing.answers_agree(student.text, t.text, task_type=route.task.task_type, labels=route.task.labels)
    GW.logs.add(deployment_id=route.id, key_id=key_id, version=route.version, route="shadow", status=200,
                upstream_ms=t.latency_ms, input_tokens=t.input_tokens, output_tokens=t.output_tokens,
                cost_usd=route.teacher.cost(t.input_tokens, t.output_tokens), agreed=agreed, query=query,
                response=student.text, teacher_response=t.text, finish_reason=t.finish_reason,
                confidence=student.confidence)


@dataclass(slots=True)
class Ask:
    """One validated chat-completions request: who sent it, the deployment, the query and the
    options the gateway acts on; ``t0`` its arrival (``time.perf_counter``)."""

    t0: float
    key_id: int
    route: Route
    query: str
    stream: bool
    include_usage: bool
    user: str | None
    max_tokens: int | None


async def _parse(request: Request, t0: float) -> Ask | Response:
    """The request as an ``Ask``, or the error response (401, 400 naming the field, 404, 413)."""
    who = _auth(request)
    if who is None:
        return _error(401, "Invalid or revoked API key (send Authorization: Bearer <key>).", code="invalid_api_key")
    key_id, team_id = who
    raw = await _read_body(request)
    if isinstance(raw, Response):
        return raw
    try:
        body = _loads(raw)
    except JSONTooDeep:
        return _error(400, f"The request body nests JSON more than {MAX_DEPTH} levels deep.", code="invalid_json")
    except ValueError:
        return _error(400, "The request body is not JSON.", code="invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    route = GW.snapshot.routes.get((team_id, model)) if isinstance(model, str) else None
    if route is None:
        return _error(404, f"The model {model!r} does not exist or you do not have access to it.",
                      code="model_not_found", type_="invalid_request_error")
    query = routing.last_user_text(body.get("messages"))
    if query is None:
        return _error(400, "messages: give at least one user message with text content (a string, or text parts "
                      "whose text is a string).", code="invalid_messages", param="messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return _error(400, "stream: must be true or false.", code="invalid_stream", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        return _error(400, "stream_options: must be an object, e.g. {\"include_usage\": true}.",
                      code="invalid_stream_options", param="stream_options")
    user = body.get("user")
    mt_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(mt_field)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= MAX_TOKENS):
        return _error(400, f"{mt_field}: must be a whole number from 1 to {MAX_TOKENS}.", code="invalid_max_tokens",
                      param=mt_field)
    return Ask(t0=t0, key_id=key_id, route=route, query=query, stream=bool(stream),
               include_usage=bool((stream_options or {}).get("include_usage")),
               user=user if isinstance(user, str) else None, max_tokens=max_tokens)


async def _ask_student(ask: Ask) -> tuple[Reply | None, str, str]:
    """(the student's reply or None, the path: ``student`` or ``fallback``, why it fell back)."""
    route = ask.route
    try:
        reply = await chat(GW.client, route.student, _messages_for(route, ask.query, "student"),
                           max_tokens=ask.max_tokens)
    except UpstreamError as exc:
        return None, "fallback", f"student failed: {exc}"
    conf = reply.confidence
    if routing.below_threshold(conf, route.confidence_threshold):
        return reply, "fallback", (f"confidence {conf:.4g} under {route.confidence_threshold:g}" if conf is not None
                                   else "the student gave no confidence")
    return reply, "student", ""


async def _ask_teacher(ask: Ask) -> Reply | UpstreamStream:
    """The teacher's answer: for a streamed request its SSE stream once the headers are in (a
    ``Reply`` if it answered JSON anyway), otherwise the whole answer. Transient failures are
    retried (``GW.retry``) — for a stream only until its headers arrive, before anything reaches
    the client. Raises UpstreamError."""
    messages = _messages_for(ask.route, ask.query, "teacher")
    call = open_stream if ask.stream else chat
    return await retrying(GW.retry, call, GW.client, ask.route.teacher, messages, max_tokens=ask.max_tokens)


def _teacher_failed(ask: Ask, path: str, error: str, confidence: float | None, exc: UpstreamError) -> Response:
    """Log the failed request and answer with the upstream's status and a generic message: the
    upstream's own answer stays in the request log (echoing it would hand the client whatever an
    internal address behind a URL answers)."""
    route = ask.route
    GW.logs.add(deployment_id=route.id, key_id=ask.key_id, version=route.version, route=path, status=exc.status,
                stream=ask.stream, latency_ms=(time.perf_counter() - ask.t0) * 1000.0, query=ask.query,
                confidence=confidence, error=((f"{error}; " if error else "") + str(exc)
                                              + (f" (after {exc.tries} tries)" if exc.tries > 1 else ""))[:2000])
    status = exc.status if 400 <= exc.status < 600 else 502
    return _error(status, f"The teacher upstream failed (HTTP {status}); see the deployment's request log.",
                  type_="upstream_error", code=exc.code if exc.code in OWN_CODES else "upstream_error",
                  headers=exc.headers)


def _log_answer(ask: Ask, path: str, answer: Reply, student_reply: Reply | None, error: str) -> None:
    """One request-log row for an answered request: tokens, cost (the student's too on a
    fallback), agreement of a fallen-back student with the teacher."""
    route = ask.route
    fell_back = path == "fallback" and student_reply is not None
    upstream = route.student if path == "student" else route.teacher
    GW.logs.add(deployment_id=route.id, key_id=ask.key_id, version=route.version, route=path, status=200,
                stream=ask.stream, latency_ms=(time.perf_counter() - ask.t0) * 1000.0, upstream_ms=answer.latency_ms,
                input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                confidence=student_reply.confidence if student_reply is not None else None,
                cost_usd=upstream.cost(answer.input_tokens, answer.output_tokens)
                + (route.student.cost(student_reply.input_tokens, student_reply.output_tokens) if fell_back else 0.0),
                agreed=(routing.answers_agree(student_reply.text, answer.text, task_type=route.task.task_type,
                                              labels=route.task.labels) if fell_back else None),
                query=ask.query, response=answer.text, teacher_response=answer.text if path != "student" else None,
                finish_reason=answer.finish_reason, error=error[:2000])


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: validate, route (student or teacher), fall back to the
    teacher on a failing or unsure student, log, answer (JSON or SSE)."""
    ask = await _parse(request, time.perf_counter())
    if isinstance(ask, Response):
        return ask
    route = ask.route
    answer, student_reply, path, error = None, None, "teacher", ""
    if routing.route_fraction(route.slug, ask.user, GW.rng) < route.student_share:
        student_reply, path, error = await _ask_student(ask)
        if path == "student":
            answer = student_reply
    confidence = student_reply.confidence if student_reply is not None else None
    if answer is None:
        try:
            answer = await _ask_teacher(ask)
        except UpstreamError as exc:
            return _teacher_failed(ask, path, error, confidence, exc)
        if isinstance(answer, UpstreamStream):
            return _relay_response(ask, path, answer, student_reply, error)
    elif route.shadow_share > 0 and GW.rng.random() < route.shadow_share:
        GW.spawn(_shadow(route, ask.query, answer, ask.key_id))
    _log_answer(ask, path, answer, student_reply, error)
    return _reply(ask, path, answer, confidence)


def _reply(ask: Ask, path: str, answer: Reply, confidence: float | None) -> Response:
    """The answer as a chat.completion (JSON) or as chat.completion.chunk events (SSE)."""
    route = ask.route
    created = int(time.time())
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    usage = {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
             "total_tokens": answer.input_tokens + answer.output_tokens}
    ext = {"route": path, "confidence": confidence, "deployment_version": route.version}
    headers = {"x-distillhub-route": path, "x-distillhub-deployment-version": str(route.version)}
    if not ask.stream:
        return Response(dumps({
            "id": cid, "object": "chat.completion", "created": created, "model": route.slug,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": answer.finish_reason}],
            "usage": usage, "distillhub": ext}), media_type="application/json", headers=headers)
    return StreamingResponse(_sse(cid, created, route.slug, answer, usage if ask.include_usage else None, ext),
                             media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


def _relay_response(ask: Ask, path: str, stream: UpstreamStream, student_reply: Reply | None,
                    error: str) -> Response:
    """The teacher's SSE stream passed through as it arrives (see ``_relay``)."""
    route = ask.route
    ext = {"route": path, "confidence": student_reply.confidence if student_reply is not None else None,
           "deployment_version": route.version}
    headers = {"x-distillhub-route": path, "x-distillhub-deployment-version": str(route.version),
               "Cache-Control": "no-cache"}
    return StreamingResponse(_relay(ask, path, stream, student_reply, error, ext), media_type="text/event-stream",
                             headers=headers)


async def _relay(ask: Ask, path: str, stream: UpstreamStream, student_reply: Reply | None, error: str, ext: dict):
    """Forward each upstream chunk as it arrives, with the gateway's id and the deployment's slug
    as ``model`` (the ``distillhub`` extension on the chunk with the finish reason; the usage
    chunk only when the client asked ``include_usage``), then log the whole answer like a
    buffered one: text, tokens (the upstream's usage event, or else the content chunks counted
    as output tokens), cost, latency. Once the first byte is out nothing is retried: a stream
    that breaks ends with an OpenAI-style ``error`` event, logged."""
    created, cid, slug = int(time.time()), "chatcmpl-" + uuid.uuid4().hex[:24], ask.route.slug
    parts: list[str] = []
    finish, usage, counted, upstream_ms = None, None, 0, None
    try:
        async for obj in stream.chunks():
            if isinstance(obj.get("usage"), dict):
                usage = obj["usage"]
            choices = obj.get("choices")
            if not choices or not isinstance(choices[0], dict):
                continue  # the usage event: sent below, if asked for
            c = choices[0]
            delta = c.get("delta") if isinstance(c.get("delta"), dict) else {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                parts.append(delta["content"])
                counted += 1
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": slug,
                   "choices": [{"index": 0, "delta": delta, "logprobs": c.get("logprobs"),
                                "finish_reason": c.get("finish_reason")}]}
            if c.get("finish_reason"):
                finish = c["finish_reason"]
                out["distillhub"] = ext
            yield b"data: " + dumps(out) + b"\n\n"
        upstream_ms = (time.perf_counter() - stream.t0) * 1000.0
        if finish is None:
            if not stream.done:  # cut off: neither a finish reason nor [DONE]
                raise UpstreamError(f"{ask.route.teacher.name}: the stream ended without a finish reason or [DONE]",
                                    code="upstream_bad_response")
            finish = "stop"  # ended properly without saying why: close the answer for the client
            yield _chunk(cid, created, slug, {}, finish, distillhub=ext)
        tokens_in, tokens_out = _stream_tokens(usage, counted)
        if ask.include_usage:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": slug, "choices": [],
                   "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                             "total_tokens": tokens_in + tokens_out}}
            yield b"data: " + dumps(obj) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except UpstreamError as exc:
        error = (f"{error}; " if error else "") + f"stream broke after {len(parts)} chunks: {exc}"[:2000]
        finish = finish or "error"
        yield b"data: " + dumps({"error": {"message": "The teacher upstream's stream broke; see the deployment's "
                                                      "request log.", "type": "upstream_error",
                                           "code": exc.code if exc.code in OWN_CODES else "upstream_error"}}) + b"\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: log what it got
        error = (f"{error}; " if error else "") + f"the client disconnected after {len(parts)} chunks"
        finish = finish or "disconnected"
        raise
    finally:
        stream.close()
        tokens_in, tokens_out = _stream_tokens(usage, counted)
        answer = Reply(text="".join(parts), finish_reason=finish or "stop", input_tokens=tokens_in,
                       output_tokens=tokens_out,
                       latency_ms=upstream_ms if upstream_ms is not None else (time.perf_counter() - stream.t0) * 1000.0)
        _log_answer(ask, path, answer, student_reply, error)


def _stream_tokens(usage: dict | None, counted: int) -> tuple[int, int]:
    """(input, output) tokens of a streamed answer: the upstream's usage event, or else 0 input
    tokens and the content chunks counted (one token each, as servers stream them)."""
    if usage:
        try:
            return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            pass
    return 0, counted


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None, **more) -> bytes:
    obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
    return b"data: " + dumps(obj) + b"\n\n"


async def _sse(cid: str, created: int, model: str, answer: Reply, usage: dict | None, ext: dict):
    """A whole answer as OpenAI chat.completion.chunk events, in pieces of about 16 characters;
    the last event is ``data: [DONE]``. For the student route (its confidence must be judged
    before anything is sent) and a teacher that answered JSON to a streamed request; the
    teacher's own stream is passed through by ``_relay``."""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
    text = answer.text or ""
    for i in range(0, len(text), 16):
        yield _chunk(cid, created, model, {"content": text[i:i + 16]}, None)
    yield _chunk(cid, created, model, {}, answer.finish_reason, distillhub=ext)
    if usage is not None:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": usage}
        yield b"data: " + dumps(obj) + b"\n\n"
    yield b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def lifespan(app):
    GW.client = make_client()
    await GW.refresh()
    GW.tasks = [asyncio.create_task(GW.refresh_forever()), asyncio.create_task(GW.logs.run())]
    try:
        yield
    finally:
        for t in GW.tasks:
            t.cancel()
        if GW.background:
            await asyncio.gather(*GW.background, return_exceptions=True)
        await GW.logs.flush()
        await GW.client.close()


app = Starlette(routes=[
    HttpRoute("/v1/chat/completions", chat_completions, methods=["POST"]),
    HttpRoute("/v1/models", models, methods=["GET"]),
    HttpRoute("/healthz", healthz, methods=["GET"]),
], lifespan=lifespan)
