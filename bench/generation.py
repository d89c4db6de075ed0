"""Benchmark: teacher generation throughput against a loopback OpenAI-compatible endpoint that
answers after 100 ms and admits at most 32 requests at once (a ceiling of 320 requests/s).

Measures the pipeline's async core (workers.pipeline.generation.Generator with the real
OpenAITeacher client and the quality checks) directly, and a sequential loop (one request at a
time with the same client: the seed's loop) on a sample of the queries. Queries are BANKING77
training texts when ../shared/data is there, else numbered synthetic ones.

Usage: python bench/generation.py [--quick] [--queries N] [--concurrency N]
Last line: JSON with ratio_vs_sequential, fraction_of_ceiling, requests_per_s.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.openai_stub import serve_in_subprocess  # noqa: E402
from workers.pipeline.generation import Generator, Group  # noqa: E402
from workers.pipeline.specs import QueryItem, TaskSpec  # noqa: E402
from workers.pipeline.security import SecurityPolicy  # noqa: E402
from workers.pipeline.teachers import OpenAITeacher, TeacherConfig  # noqa: E402

DELAY_S = 0.100
MAX_IN_FLIGHT = 32
CEILING = MAX_IN_FLIGHT / DELAY_S  # requests per second


def load_queries(n: int) -> tuple[list[str], tuple[str, ...]]:
    data = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data")) / "banking77" / "train.csv"
    if data.exists():
        with open(data, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        labels = tuple(sorted({r["category"] for r in rows}))
        texts = [rows[i % len(rows)]["text"] + ("" if i < len(rows) else f" #{i}") for i in range(n)]
        return texts, labels
    return [f"query number {i}" for i in range(n)], ("a", "b")


def _first_label(labels):
    def answer(text: str) -> str:
        return labels[0]

    return answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 queries instead of 2,000")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=40, help="requests in flight (the pipeline's bound)")
    ap.add_argument("--sequential", type=int, default=40, help="requests timed for the sequential loop")
    args = ap.parse_args()
    n = args.queries or (500 if args.quick else 2000)
    texts, labels = load_queries(n)
    task = TaskSpec(task_type="classification", labels=labels, instructions="Classify the customer's message.")
    # The endpoint runs in its own process, as a real server would (no shared GIL).
    proc, base_url = serve_in_subprocess(answer=_first_label(labels), delay_s=DELAY_S, max_in_flight=MAX_IN_FLIGHT)
    # The stub listens on loopback: allowed here as DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS=1 would.
    cfg = TeacherConfig(id=1, name="stub", provider="openai", model="stub", base_url=base_url, timeout_s=30,
                        price_in_per_1m=0.15, price_out_per_1m=0.6,
                        policy=SecurityPolicy(allow_private_teacher_urls=True))
    try:
        # Sequential loop: one request after another.
        async def sequential(k: int) -> float:
            client = OpenAITeacher(cfg, labels)
            from workers.pipeline.prompts import teacher_messages

            t0 = time.perf_counter()
            for t in texts[:k]:
                await client.answer(teacher_messages(task, t))
            el = time.perf_counter() - t0
            await client.close()
            return el

        seq_s = asyncio.run(sequential(args.sequential))
        seq_rps = args.sequential / seq_s

        out = []
        gen = Generator(task, {1: OpenAITeacher(cfg, labels)}, {1: cfg}, emit=out.append, concurrency=args.concurrency)
        groups = [Group(QueryItem(i, t), 1) for i, t in enumerate(texts)]
        t0 = time.perf_counter()
        asyncio.run(gen.run(groups))
        el = time.perf_counter() - t0
    finally:
        proc.terminate()
    ok = sum(1 for r in out if r.status != "failed")
    rps = len(out) / el
    res = {
        "queries": n, "concurrency": args.concurrency, "answered": ok, "failed": len(out) - ok,
        "seconds": round(el, 2), "requests_per_s": round(rps, 1), "sequential_requests_per_s": round(seq_rps, 2),
        "ratio_vs_sequential": round(rps / seq_rps, 2), "ceiling_requests_per_s": CEILING,
        "fraction_of_ceiling": round(rps / CEILING, 3),
    }
    print(f"endpoint: {DELAY_S * 1000:.0f} ms per answer, at most {MAX_IN_FLIGHT} at once -> ceiling {CEILING:.0f} req/s")
    print(f"sequential loop: {seq_rps:.2f} req/s ({args.sequential} requests)")
    print(f"pipeline: {n} queries in {el:.2f} s = {rps:.1f} req/s with {args.concurrency} in flight "
          f"({ok} answered, {len(out) - ok} failed)")
    print(f"ratio vs sequential: {rps / seq_rps:.1f}x (target >= 15x); fraction of ceiling: {rps / CEILING:.2f} (target >= 0.8)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
