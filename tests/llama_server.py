"""llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on loopback, for the tests
that need a real local endpoint: the teacher tests (the bundled SmolLM2 GGUF) and the GGUF
export test (the exported student)."""
from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port


@contextlib.contextmanager
def llama_server(gguf: str | Path, *, alias: str, n_ctx: int = 2048, wait_s: float = 300):
    """Serve ``gguf`` as model ``alias``; yields the base URL (ending in ``/v1``). Fails the test
    when llama-cpp-python is missing or the server does not answer within ``wait_s`` seconds."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed (see requirements-test.txt)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(n_ctx), "--model_alias", alias, "--n_threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + wait_s
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llama.cpp server exited at start (serving {gguf})")
                if time.time() > deadline:
                    pytest.fail(f"llama.cpp server did not answer within {wait_s:g} s")
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
