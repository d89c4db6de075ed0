"""A loopback OpenAI-compatible Chat Completions server for injecting API faults (tests) and
for the generation benchmark. Not a teacher: real answers come from real models elsewhere.

Faults are chosen by markers in the last user message:
``[429]`` 429 rate limit with ``Retry-After: 1`` on the first try, then an answer;
``[500]`` a 500 on the first try, then an answer; ``[quota]`` 429 ``insufficient_quota``;
``[hang]`` never answers (the client's timeout must fire); ``[length]`` finish_reason
``length``; ``[filter]`` finish_reason ``content_filter`` with null content; ``[badjson]`` an
answer that is not JSON. Otherwise it answers ``answer(text)``.

``hang_after=K`` answers the first K requests and makes every later one hang until
``release()`` (counted when a request arrives, so exactly K are answered however many are in
flight at once); hung requests then close without an answer (never counted as completed).
``delay_s`` and ``max_in_flight`` model a slow endpoint with a concurrency ceiling.

A request with ``"stream": true`` gets an SSE answer (chat.completion.chunk events, one per word,
``stream_delay_s`` apart; a usage chunk when ``stream_options.include_usage``; ``data: [DONE]``).
``stream_gate`` (a ``threading.Event``) holds the last word until it is set (at most 10 s);
``gate_opened`` records whether it was set in time, i.e. whether the client saw the first words
while the answer was still unfinished. ``bodies`` keeps every request body received.
``[cut]`` (streamed) the connection closes after two words. ``[503]`` a 503 on the first try, then an answer; ``[500x]`` / ``[400]`` always a 500 / 400.
"""
from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    """Start with ``StubServer(...).start()``; ``base_url`` is ``http://127.0.0.1:PORT/v1``.
    ``completed``: Counter of fully answered requests by last user message; ``attempts``:
    Counter of all requests received by message."""

    def __init__(self, *, answer=None, delay_s: float = 0.0, max_in_flight: int | None = None, hang_after: int | None = None):
        self.answer = answer or (lambda text: "ok")
        self.delay_s = delay_s
        self.hang_after = hang_after
        self.completed: collections.Counter = collections.Counter()
        self.attempts: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.gate = threading.Semaphore(max_in_flight) if max_in_flight else None
        self._release = threading.Event()
        self.in_flight = 0
        self.admitted = 0  # requests let through to be answered (see hang_after)
        self.max_seen_in_flight = 0
        self.stream_delay_s = 0.0
        self.stream_gate: threading.Event | None = None
        self.gate_opened: bool | None = None
        self.bodies: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # One write per response and no Nagle delay: otherwise headers and body go out in two
            # segments and the client's delayed ACK adds ~40 ms to every answer.
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                text = next((m.get("content") or "" for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
                stub._handle(self, body, text)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # many clients connect at once; the default backlog of 5 drops them
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "StubServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def release(self) -> None:
        """Let hung requests go (they close without an answer) and stop hanging new ones."""
        self.hang_after = None
        self._release.set()

    @property
    def total_completed(self) -> int:
        return sum(self.completed.values())

    # -- behaviour -------------------------------------------------------------------------
    def _send(self, h, status: int, payload: dict, headers: dict | None = None, text: str | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
        if status == 200 and text is not None:
            with self.lock:
                self.completed[text] += 1

    def _handle(self, h, body: dict, text: str) -> None:
        with self.lock:
            self.bodies.append(body)
            self.attempts[text] += 1
            first = self.attempts[text] == 1
            must_hang = self.hang_after is not None and self.admitted >= self.hang_after
            if not must_hang and "[hang]" not in text:
                self.admitted += 1
        if "[hang]" in text or must_hang:
            self._release.wait(timeout=60)
            h.close_connection = True
            return
        if "[quota]" in text:
            return self._send(h, 429, {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                                                 "code": "insufficient_quota"}})
        if "[429]" in text and first:
            return self._send(h, 429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                 "code": "rate_limit_exceeded"}}, {"Retry-After": "1"})
        if "[500]" in text and first:
            return self._send(h, 500, {"error": {"message": "upstream hiccup", "type": "server_error"}})
        if "[503]" in text and first:
            return self._send(h, 503, {"error": {"message": "overloaded", "type": "server_error"}})
        if "[500x]" in text:
            return self._send(h, 500, {"error": {"message": "upstream is down", "type": "server_error"}})
        if "[400]" in text:
            return self._send(h, 400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        if self.gate:
            self.gate.acquire()
        try:
            with self.lock:
                self.in_flight += 1
                self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
            if self.delay_s:
                time.sleep(self.delay_s)
            with self.lock:
                self.in_flight -= 1
        finally:
            if self.gate:
                self.gate.release()
        if body.get("stream"):
            return self._stream(h, body, text)
        finish, content = "stop", self.answer(text)
        if "[length]" in text:
            finish, content = "length", "This answer was cut off in the mid"
        elif "[filter]" in text:
            finish, content = "content_filter", None
        elif "[badjson]" in text:
            content = '{"name": "Ann", "age": '
        self._send(h, 200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
        }, text=text)

    def _stream(self, h, body: dict, text: str) -> None:
        """Answer as SSE, word by word; the body ends when the connection closes."""
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "stub")}
        words = self.answer(text).split(" ")
        _sse(h, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i, w in enumerate(words):
            if i == len(words) - 1 and self.stream_gate is not None:
                self.gate_opened = self.stream_gate.wait(timeout=10)
            elif i and self.stream_delay_s:
                time.sleep(self.stream_delay_s)
            piece = w if i == 0 else " " + w
            _sse(h, {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            if "[cut]" in text and i == 1:
                return  # the connection closes: no finish reason, no [DONE]
        _sse(h, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            _sse(h, {**base, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": len(words),
                                                       "total_tokens": 20 + len(words)}})
        _sse(h, b"[DONE]")
        with self.lock:
            self.completed[text] += 1


def _sse(h, obj) -> None:
    h.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
    h.wfile.flush()


def serve_in_subprocess(**kwargs):
    """Run a StubServer in a child process (so its threads do not share the caller's GIL, as a
    real endpoint would not); returns ``(process, base_url)``. Terminate the process when done."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def target(conn, kw):
        s = StubServer(**kw).start()
        conn.send(s.base_url)
        threading.Event().wait()

    p = ctx.Process(target=target, args=(child, kwargs), daemon=True)
    p.start()
    return p, parent.recv()
