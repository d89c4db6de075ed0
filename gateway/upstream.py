"""Calls to the models behind a deployment: an OpenAI-compatible endpoint over a pooled async
HTTP client (aiohttp: several times less CPU per call than httpx2, whose connection pool scans
every connection on each request), or a classifier student loaded in-process. Each call returns a
``Reply`` or raises ``UpstreamError``."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import aiohttp
import orjson

from gateway.routing import mean_token_logprob


@dataclass(frozen=True)
class Upstream:
    """One model endpoint. ``base_url`` ends in ``/v1``; ``api_key`` is the resolved secret (never
    logged); ``artifact_path``: a classifier folder answered in-process instead of over HTTP.
    Prices in USD per 1M tokens; ``timeout_s`` per call."""

    name: str
    base_url: str = ""
    model: str = ""
    api_key: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 60.0
    price_in_per_1m: float = 0.0
    price_out_per_1m: float = 0.0
    artifact_path: str = ""
    want_logprobs: bool = False

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one call."""
        return (input_tokens * self.price_in_per_1m + output_tokens * self.price_out_per_1m) / 1e6

    # Built once per snapshot, not per request.
    @cached_property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    @cached_property
    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    @cached_property
    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s, connect=min(5.0, self.timeout_s))


@dataclass
class Reply:
    """One answer: text, finish reason, token counts, confidence (see Deployment), latency in
    ms."""

    text: str | None
    finish_reason: str = "stop"
    input_tokens: int = 0
    output_tokens: int = 0
    confidence: float | None = None
    latency_ms: float = 0.0
    extra: dict = field(default_factory=dict)


class UpstreamError(Exception):
    """An upstream failed. ``status``: the HTTP status to answer with (the upstream's own for an
    HTTP error, 502 unreachable, 504 timeout); ``code``: the upstream's error code if any. The
    message (which may quote the upstream's answer) is for the request log only, never for the
    gateway's client."""

    def __init__(self, message: str, *, status: int = 502, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}
        self.tries = 1


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed teacher call is retried: at most ``retries`` more tries, after a jittered
    exponential backoff (``backoff_s`` × 2^n × [0.5, 1)), or after the upstream's
    ``Retry-After`` on a 429/503 when it is at most ``retry_after_max_s`` (a longer one is not
    waited for: the client gets the error with that Retry-After at once)."""

    retries: int = 2
    backoff_s: float = 0.25
    retry_after_max_s: float = 5.0

    def delay(self, attempt: int, exc: "UpstreamError", rng=random) -> float | None:
        """Seconds to wait before retrying after try number ``attempt`` (0-based) failed with
        ``exc``; None when it is not retried (out of tries, or not transient)."""
        if attempt >= self.retries or not transient(exc):
            return None
        after = exc.headers.get("Retry-After")
        if after is not None:
            return float(after) if float(after) <= self.retry_after_max_s else None
        return self.backoff_s * 2 ** attempt * (0.5 + rng.random() / 2)


def transient(exc: "UpstreamError") -> bool:
    """Whether a failure may pass by itself: a timeout, an unreachable upstream, a 429 (except
    ``insufficient_quota``, which waiting does not fix) or a 5xx. Never another 4xx, nor an
    answer that was not a chat completion."""
    if exc.code in ("upstream_timeout", "upstream_unreachable"):
        return True
    if exc.status == 429:
        return exc.code != "insufficient_quota"
    return exc.status >= 500 and exc.code not in ("upstream_bad_response", "student_error")


async def retrying(policy: RetryPolicy, call, *args, **kwargs):
    """``await call(*args, **kwargs)``, retried on transient UpstreamErrors per ``policy``. The
    last error is raised with ``tries`` set (how many calls were made)."""
    attempt = 0
    while True:
        try:
            return await call(*args, **kwargs)
        except UpstreamError as exc:
            wait = policy.delay(attempt, exc)
            if wait is None:
                exc.tries = attempt + 1
                raise
            await asyncio.sleep(wait)
            attempt += 1


#: Error codes the gateway sets itself (an upstream's own code is never passed on to clients).
OWN_CODES = frozenset({"upstream_timeout", "upstream_unreachable", "upstream_bad_response", "student_error"})


def make_client() -> aiohttp.ClientSession:
    """One pooled client per gateway process (keep-alive connections to every upstream); call it
    inside the running event loop."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000, limit_per_host=0, ttl_dns_cache=60,
                                                                keepalive_timeout=30),
                                 timeout=aiohttp.ClientTimeout(total=60.0, connect=5.0), auto_decompress=True,
                                 skip_auto_headers=("User-Agent",))


def request_body(up: Upstream, messages: list[dict], *, max_tokens: int | None = None,
                 temperature: float | None = None, stream: bool = False) -> dict:
    """The chat-completions request for ``up`` (its model, max_tokens and temperature unless the
    caller gives them; ``logprobs`` when the deployment judges confidence by them)."""
    body: dict = {"model": up.model, "messages": messages}
    mt = max_tokens if max_tokens is not None else up.max_tokens
    if mt is not None:
        body["max_tokens"] = mt
    t = temperature if temperature is not None else up.temperature
    if t is not None:
        body["temperature"] = t
    if up.want_logprobs:
        body["logprobs"] = True
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def http_error(up: Upstream, status: int, raw: bytes, headers) -> UpstreamError:
    """The UpstreamError for an HTTP error answer: its status, its error code, its Retry-After
    (whole seconds only)."""
    msg, code = raw[:500].decode("utf-8", "replace"), None
    try:
        err = orjson.loads(raw).get("error") or {}
        if isinstance(err, dict):
            msg, code = err.get("message") or msg, err.get("code") or err.get("type")
        elif isinstance(err, str):
            msg = err
    except (ValueError, AttributeError):
        pass
    retry_after = (headers.get("Retry-After") or "").strip()
    hdrs = {"Retry-After": retry_after} if retry_after.isdigit() and len(retry_after) <= 6 else {}
    return UpstreamError(f"{up.name}: HTTP {status}: {msg}", status=status, code=code, headers=hdrs)


def timeout_error(up: Upstream) -> UpstreamError:
    return UpstreamError(f"{up.name}: no answer within {up.timeout_s:g} s", status=504, code="upstream_timeout")


def unreachable_error(up: Upstream, exc: Exception) -> UpstreamError:
    return UpstreamError(f"{up.name}: unreachable ({type(exc).__name__}: {exc})", status=502,
                         code="upstream_unreachable")


def parse_completion(up: Upstream, raw: bytes, ms: float) -> Reply:
    """A ``Reply`` from a chat.completion body. Raises UpstreamError (502) when it is not one."""
    try:
        data = orjson.loads(raw)
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        usage = data.get("usage") or {}
        ext = data.get("distillhub") or {}
        conf = ext.get("confidence") if isinstance(ext, dict) else None
        if conf is None:
            conf = mean_token_logprob(choice.get("logprobs"))
        return Reply(text=msg.get("content"), finish_reason=choice.get("finish_reason") or "stop",
                     input_tokens=int(usage.get("prompt_tokens") or 0),
                     output_tokens=int(usage.get("completion_tokens") or 0),
                     confidence=float(conf) if conf is not None else None, latency_ms=ms)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UpstreamError(f"{up.name}: the answer is not an OpenAI chat completion", status=502,
                            code="upstream_bad_response") from None


async def chat(client: aiohttp.ClientSession, up: Upstream, messages: list[dict], *, max_tokens: int | None = None,
               temperature: float | None = None) -> Reply:
    """Ask ``up`` to answer ``messages`` (one try). Raises UpstreamError naming the upstream."""
    if up.artifact_path:
        return await classify(up, messages)
    data = orjson.dumps(request_body(up, messages, max_tokens=max_tokens, temperature=temperature))
    t0 = time.perf_counter()
    try:
        async with client.post(up.url, data=data, headers=up.headers, timeout=up.timeout) as r:
            raw = await r.read()
            status, headers = r.status, r.headers
    except TimeoutError:  # aiohttp's timeouts (ServerTimeoutError included) are TimeoutErrors
        raise timeout_error(up) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise unreachable_error(up, exc) from None
    ms = (time.perf_counter() - t0) * 1000.0
    if status >= 400:
        raise http_error(up, status, raw, headers)
    return parse_completion(up, raw, ms)


class UpstreamStream:
    """An upstream's SSE answer being received: ``chunks()`` yields each chat.completion.chunk as a
    dict as it arrives; ``close()`` releases the connection. ``t0``: when the call started
    (``time.perf_counter``)."""

    def __init__(self, up: Upstream, response: aiohttp.ClientResponse, t0: float) -> None:
        self.up, self.response, self.t0 = up, response, t0
        self.done = False  # ``data: [DONE]`` arrived

    async def chunks(self):
        """The ``data:`` events as dicts, up to ``[DONE]`` or the end of the body. Raises
        UpstreamError when the connection breaks, a gap between events passes the timeout, or an
        event is not JSON (or is an ``error`` event)."""
        up = self.up
        try:
            async for line in self.response.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.done = True
                    return
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"{up.name}: a stream event is not JSON", code="upstream_bad_response") from None
                if not isinstance(obj, dict):
                    raise UpstreamError(f"{up.name}: a stream event is not an object", code="upstream_bad_response")
                if obj.get("error"):
                    raise UpstreamError(f"{up.name}: error event: {str(obj['error'])[:500]}", code="upstream_error")
                yield obj
        except TimeoutError:
            raise UpstreamError(f"{up.name}: the stream stalled for {up.timeout_s:g} s", status=504,
                                code="upstream_timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{up.name}: the stream broke ({type(exc).__name__}: {exc})",
                                code="upstream_unreachable") from None
        except ValueError as exc:  # a line longer than aiohttp's buffer
            raise UpstreamError(f"{up.name}: a stream event is too long ({exc})", code="upstream_bad_response") from None

    def close(self) -> None:
        self.response.release()


async def open_stream(client: aiohttp.ClientSession, up: Upstream, messages: list[dict], *,
                      max_tokens: int | None = None) -> UpstreamStream | Reply:
    """Ask ``up`` for a streamed answer (``stream`` with ``stream_options.include_usage``, so the
    last event carries the token counts) and return once its headers are in: an
    ``UpstreamStream``, or a ``Reply`` when the upstream answered with plain JSON instead (some
    servers ignore ``stream``). ``timeout_s`` bounds the wait for the headers and each gap between
    events, not the whole answer. Raises UpstreamError (one try; nothing was sent to the client)."""
    data = orjson.dumps(request_body(up, messages, max_tokens=max_tokens, stream=True))
    t0 = time.perf_counter()
    try:
        r = await client.post(up.url, data=data, headers=up.headers,
                              timeout=aiohttp.ClientTimeout(total=None, connect=up.timeout.connect,
                                                            sock_read=up.timeout_s))
    except TimeoutError:
        raise timeout_error(up) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise unreachable_error(up, exc) from None
    if r.status < 400 and r.content_type == "text/event-stream":
        return UpstreamStream(up, r, t0)
    try:
        raw = await r.read()
    except TimeoutError:
        raise timeout_error(up) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise unreachable_error(up, exc) from None
    finally:
        r.release()
    if r.status >= 400:
        raise http_error(up, r.status, raw, r.headers)
    return parse_completion(up, raw, (time.perf_counter() - t0) * 1000.0)


# --- The in-process classifier student ---------------------------------------------------------

_CLASSIFIERS: dict[str, object] = {}
_LOAD_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()


def load_classifier(path: str):
    """The classifier folder at ``path``, loaded once per process (``SequenceClassifier``)."""
    with _LOAD_LOCK:
        if path not in _CLASSIFIERS:
            from workers.pipeline.evaluation import SequenceClassifier

            _CLASSIFIERS[path] = SequenceClassifier(path)
        return _CLASSIFIERS[path]


def classify_text(path: str, text: str) -> Reply:
    """Label ``text`` with the classifier at ``path``: the top label, its probability as the
    confidence, the input token count."""
    import torch

    clf = load_classifier(path)
    t0 = time.perf_counter()
    with _RUN_LOCK, torch.inference_mode():
        enc = clf.tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        probs = torch.softmax(clf.model(**enc).logits[0].float(), dim=-1).tolist()
    dist = {clf.id2label[i]: p for i, p in enumerate(probs)}
    label = max(dist, key=dist.get)
    return Reply(text=label, finish_reason="stop", input_tokens=int(enc["input_ids"].shape[1]), output_tokens=1,
                 confidence=dist[label], latency_ms=(time.perf_counter() - t0) * 1000.0,
                 extra={"label_probs": dist})


async def classify(up: Upstream, messages: list[dict]) -> Reply:
    from gateway.routing import last_user_text

    text = last_user_text(messages) or ""
    try:
        return await asyncio.to_thread(classify_text, up.artifact_path, text)
    except Exception as exc:  # noqa: BLE001 - a broken student must fall back, whatever broke
        raise UpstreamError(f"{up.name}: {type(exc).__name__}: {exc}", status=502, code="student_error") from None


def dumps(obj) -> bytes:
    """Compact UTF-8 JSON (orjson)."""
    return orjson.dumps(obj)
