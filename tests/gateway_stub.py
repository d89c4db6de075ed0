"""A loopback student endpoint for the gateway tests: an OpenAI-compatible server that answers
``answer(text)`` and reports a chosen confidence, as ``distill serve-student`` or vLLM would:
``logprobs.content`` (a causal LM) when the request asks for ``logprobs``. Markers in the user
message: ``[unsure]`` token log-probabilities averaging -2.5, otherwise -0.05; ``[boom]`` always a
500. Used to inject what a real student cannot be made to do on demand (be unsure, fail)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StudentStub:
    def __init__(self, *, answer=None) -> None:
        self.answer = answer or (lambda text: "student")
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub.requests.append(body)
                text = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
                if "[boom]" in text:
                    return self._send(500, {"error": {"message": "student crashed", "type": "server_error"}})
                lp = -2.5 if "[unsure]" in text else -0.05
                content = stub.answer(text)
                logprobs = ({"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                         for t in content.split()]} if body.get("logprobs") else None)
                self._send(200, {"id": "chatcmpl-student", "object": "chat.completion", "created": int(time.time()),
                                 "model": body.get("model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "logprobs": logprobs, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "StudentStub":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
