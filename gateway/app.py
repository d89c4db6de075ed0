"""The gateway's ASGI app: ``POST /v1/chat/completions`` (JSON or SSE streaming) and
``GET /v1/models`` in the OpenAI wire format, so the ``openai`` client works by changing
``base_url``; ``GET /healthz`` for probes. Run it with ``distill gateway`` or
``uvicorn gateway.app:app``.

Settings (environment): ``GATEWAY_REFRESH_S`` (default 2: how often keys and deployments are
reloaded), ``GATEWAY_FLUSH_S`` (default 1: request-log flush interval), ``GATEWAY_FLUSH_ROWS``
(default 1000), ``GATEWAY_BUFFER_MAX`` (default 100000 rows kept while Postgres is down),
``GATEWAY_MAX_BODY_BYTES`` (default 1000000: a larger request body gets 413),
``GATEWAY_STUDENT_TIMEOUT_S`` (default 60: seconds a student may take before the teacher
answers instead; a teacher's own timeout is its ``timeout_s`` setting), plus
the usual ``DATABASE_URL`` and the teachers' API-key variables.

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

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")
django.setup()

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route as HttpRoute  # noqa: E402

from gateway import routing  # noqa: E402
from gateway.logbuffer import LogBuffer  # noqa: E402
from gateway.state import Snapshot, load_snapshot, student_timeout_s  # noqa: E402
from workers.pipeline.json_limits import MAX_DEPTH, JSONTooDeep, loads_bounded  # noqa: E402
from gateway.upstream import OWN_CODES, Reply, UpstreamError, chat, dumps, make_client  # noqa: E402

log = logging.getLogger("gateway")
#: The largest max_tokens a client may ask for (more than any model here can answer).
MAX_TOKENS = 1_000_000
# httpx2 logs every request at INFO: a log line per call would cost more than the routing itself.
logging.getLogger("httpx2").setLevel(logging.WARNING)


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
    too_big = _error(413, f"The request body is larger than {limit} bytes (GATEWAY_MAX_BODY_BYTES).",
                     code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return _error(400, "Content-Length: not a number.", code="invalid_request")
        if int(declared) > limit:
            return too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_big
        chunks.append(chunk)
    return b"".join(chunks)


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
    from workers.pipeline import prompts

    if who == "teacher":
        return prompts.teacher_messages(route.task, query)
    if route.student_kind == "classifier":
        return [{"role": "user", "content": query}]
    return prompts.student_messages(route.task, query)


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


async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    who = _auth(request)
    if who is None:
        return _error(401, "Invalid or revoked API key (send Authorization: Bearer <key>).", code="invalid_api_key")
    key_id, team_id = who
    raw = await _read_body(request)
    if isinstance(raw, Response):
        return raw
    try:
        body = loads_bounded(raw)
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
    stream = bool(stream)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        return _error(400, "stream_options: must be an object, e.g. {\"include_usage\": true}.",
                      code="invalid_stream_options", param="stream_options")
    user = body.get("user") if isinstance(body.get("user"), str) else None
    mt_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(mt_field)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= MAX_TOKENS):
        return _error(400, f"{mt_field}: must be a whole number from 1 to {MAX_TOKENS}.", code="invalid_max_tokens",
                      param=mt_field)

    to_student = routing.route_fraction(route.slug, user, GW.rng) < route.student_share
    answer: Reply | None = None
    path, error, confidence, student_reply = "teacher", "", None, None
    if to_student:
        try:
            student_reply = await chat(GW.client, route.student, _messages_for(route, query, "student"),
                                       max_tokens=max_tokens)
            confidence = student_reply.confidence
            if routing.below_threshold(confidence, route.confidence_threshold):
                path = "fallback"
                error = (f"confidence {confidence:.4g} under {route.confidence_threshold:g}" if confidence is not None
                         else "the student gave no confidence")
            else:
                path, answer = "student", student_reply
        except UpstreamError as exc:
            path, error = "fallback", f"student failed: {exc}"
    upstream = route.student if path == "student" else route.teacher
    if answer is None:
        try:
            answer = await chat(GW.client, route.teacher, _messages_for(route, query, "teacher"), max_tokens=max_tokens)
        except UpstreamError as exc:
            GW.logs.add(deployment_id=route.id, key_id=key_id, version=route.version, route=path, status=exc.status,
                        stream=stream, latency_ms=(time.perf_counter() - t0) * 1000.0, query=query,
                        confidence=confidence, error=(f"{error}; " if error else "") + str(exc)[:2000])
            # The upstream's own answer stays in the request log: echoing it would hand the
            # client whatever an internal address behind a URL answers.
            status = exc.status if 400 <= exc.status < 600 else 502
            return _error(status, f"The teacher upstream failed (HTTP {status}); see the deployment's request log.",
                          type_="upstream_error", code=exc.code if exc.code in OWN_CODES else "upstream_error",
                          headers=exc.headers)
    elif route.shadow_share > 0 and GW.rng.random() < route.shadow_share:
        GW.spawn(_shadow(route, query, answer, key_id))

    created = int(time.time())
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    usage = {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
             "total_tokens": answer.input_tokens + answer.output_tokens}
    ext = {"route": path, "confidence": confidence, "deployment_version": route.version}
    headers = {"x-distillhub-route": path, "x-distillhub-deployment-version": str(route.version)}
    latency = (time.perf_counter() - t0) * 1000.0
    GW.logs.add(deployment_id=route.id, key_id=key_id, version=route.version, route=path, status=200, stream=stream,
                latency_ms=latency, upstream_ms=answer.latency_ms, input_tokens=answer.input_tokens,
                output_tokens=answer.output_tokens, confidence=confidence,
                cost_usd=upstream.cost(answer.input_tokens, answer.output_tokens)
                + (route.student.cost(student_reply.input_tokens, student_reply.output_tokens)
                   if path == "fallback" and student_reply is not None else 0.0),
                agreed=(routing.answers_agree(student_reply.text, answer.text, task_type=route.task.task_type,
                                              labels=route.task.labels)
                        if path == "fallback" and student_reply is not None else None),
                query=query, response=answer.text,
                teacher_response=answer.text if path != "student" else None,
                finish_reason=answer.finish_reason, error=error[:2000])
    if not stream:
        return Response(dumps({
            "id": cid, "object": "chat.completion", "created": created, "model": route.slug,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": answer.finish_reason}],
            "usage": usage, "distillhub": ext}), media_type="application/json", headers=headers)
    include_usage = bool((stream_options or {}).get("include_usage"))
    return StreamingResponse(_sse(cid, created, route.slug, answer, usage if include_usage else None, ext),
                             media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None, **more) -> bytes:
    obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
    return b"data: " + dumps(obj) + b"\n\n"


async def _sse(cid: str, created: int, model: str, answer: Reply, usage: dict | None, ext: dict):
    """The answer as OpenAI chat.completion.chunk events. The gateway has the whole answer
    before it replies (it must judge the student's confidence first), so it streams it in
    pieces of about 16 characters; the last event is ``data: [DONE]``."""
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
        await GW.client.aclose()


app = Starlette(routes=[
    HttpRoute("/v1/chat/completions", chat_completions, methods=["POST"]),
    HttpRoute("/v1/models", models, methods=["GET"]),
    HttpRoute("/healthz", healthz, methods=["GET"]),
], lifespan=lifespan)
