"""Benchmark: the gateway's overhead, throughput and memory on this machine.

A fast loopback upstream (a raw ASGI app under uvicorn, answering a fixed OpenAI chat completion)
plays the teacher; the gateway (uvicorn, one process) routes every request to it (student share
0) with request logging to Postgres on. A load generator in its own process keeps 200 requests
in flight and measures, per request, the latency of calling the upstream directly and through
the gateway: the overhead is the difference of the percentiles (p50, p99). The gateway's own
view (``latency_ms - upstream_ms`` from its request logs) is printed too. Then it holds the load
for a while (requests per second, errors) and samples the gateway's RSS over a bounded soak.

Needs DATABASE_URL like the app (migrated); uses a scratch team it deletes. Prints figures, and as
its last line one JSON object: overhead_p50_ms, overhead_p99_ms, direct_p50_ms, direct_p99_ms,
gateway_p50_ms, gateway_p99_ms, rps, errors, rss_start_mb, rss_end_mb, rss_peak_mb, rss_growth_mb.

    python bench/gateway.py [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

UPSTREAM = r'''
import json, time
BODY = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "card_arrival"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}}).encode()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{url} did not come up")
            time.sleep(0.2)


async def _load(url: str, key: str, n: int, concurrency: int, seconds: float | None = None) -> tuple[list, int, float]:
    """(latencies in ms, errors, wall seconds): ``n`` requests (or as many as fit in ``seconds``)
    with ``concurrency`` in flight."""
    import logging

    import httpx2

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    body = {"model": os.environ.get("BENCH_MODEL", "bench-gw"), "messages": [{"role": "user", "content": "where is my card?"}]}
    lat: list[float] = []
    errors = 0
    left = [n]
    stop_at = time.perf_counter() + seconds if seconds else None
    async with httpx2.AsyncClient(limits=httpx2.Limits(max_connections=concurrency * 2,
                                                       max_keepalive_connections=concurrency * 2),
                                  timeout=30) as client:
        headers = {"Authorization": f"Bearer {key}"}

        async def worker():
            nonlocal errors
            while (left[0] > 0) if stop_at is None else (time.perf_counter() < stop_at):
                left[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body, headers=headers)
                    ok = r.status_code == 200
                except Exception:  # noqa: BLE001 - counted
                    ok = False
                if ok:
                    lat.append((time.perf_counter() - t0) * 1000.0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors, time.perf_counter() - t0


def _pct(xs, q):
    from gateway.routing import percentile

    return percentile(xs, q)


def _loadgen_main() -> None:
    """Child process: ``--loadgen URL KEY N CONCURRENCY SECONDS`` prints one JSON line."""
    url, key, n, conc, secs = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    lat, errors, wall = asyncio.run(_load(url, key, n, conc, secs or None))
    print(json.dumps({"lat": lat, "errors": errors, "wall": wall}))


def _loadgen(url: str, key: str, n: int, conc: int, secs: float = 0) -> dict:
    r = subprocess.run([sys.executable, __file__, "--loadgen", url, key, str(n), str(conc), str(secs)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer requests, a short soak")
    args = ap.parse_args()
    n = 4000 if args.quick else 20000
    hold_s = 10 if args.quick else 30
    soak_s = 20 if args.quick else 120
    conc = 200

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")
    # The upstream is this benchmark's own loopback server: allow loopback teacher URLs here and in
    # the gateway process it starts (operators decide this for real deployments).
    os.environ["DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS"] = "1"
    import django

    django.setup()
    import psutil

    import logging

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    from projects.models import RequestLog
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create
    from projects.services.teams import team_create

    procs = []
    team = team_create(name=f"bench gateway {int(time.time())}")
    try:
        up_port, gw_port = _port(), _port()
        up_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_upstream_{os.getpid()}.py"
        up_file.write_text(UPSTREAM)
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", f"{up_file.stem}:app", "--port", str(up_port),
                                       "--log-level", "warning", "--no-access-log"], cwd=up_file.parent,
                                      start_new_session=True))
        _wait(f"http://127.0.0.1:{up_port}/v1/models", procs[-1])
        project = project_create(team=team, name=f"bench gateway {team.pk}", task_type="classification",
                                 labels=["card_arrival", "other"])
        teacher = teacher_create(project=project, name="stub", provider="openai", model="bench",
                                 base_url=f"http://127.0.0.1:{up_port}/v1")
        dep = deployment_create(project=project, name=f"bench-gw-{team.pk}", teacher=teacher, student_share=0.0,
                                student_url=f"http://127.0.0.1:{up_port}/v1", student_model="bench")
        dep_slug = dep.slug
        _, key = gateway_key_create(team=team, name="bench")
        env = dict(os.environ, GATEWAY_REFRESH_S="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:app", "--port", str(gw_port),
                                       "--log-level", "warning", "--no-access-log"], cwd=REPO, env=env,
                                      start_new_session=True))
        _wait(f"http://127.0.0.1:{gw_port}/healthz", procs[-1])
        gw = psutil.Process(procs[-1].pid)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        gw_url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        # The load generator sends model "bench-gw"; give the deployment that slug's route.
        global_body_model = dep_slug
        os.environ["BENCH_MODEL"] = global_body_model
        print(f"cpu cores {os.cpu_count()}; {n:,} requests, {conc} in flight; hold {hold_s} s; soak {soak_s} s", flush=True)

        _loadgen(direct_url, key, 500, conc)  # warm-up
        _loadgen(gw_url, key, 500, conc)
        direct = _loadgen(direct_url, key, n, conc)
        first_id = RequestLog.objects.filter(deployment=dep).order_by("-id").values_list("id", flat=True).first() or 0
        via = _loadgen(gw_url, key, n, conc)
        d50, d99 = _pct(direct["lat"], 50), _pct(direct["lat"], 99)
        g50, g99 = _pct(via["lat"], 50), _pct(via["lat"], 99)
        print(f"direct   p50 {d50:7.2f} ms  p99 {d99:7.2f} ms  ({len(direct['lat'])/direct['wall']:.0f} req/s)")
        print(f"gateway  p50 {g50:7.2f} ms  p99 {g99:7.2f} ms  ({len(via['lat'])/via['wall']:.0f} req/s, "
              f"{via['errors']} errors)")
        print(f"overhead p50 {g50 - d50:7.2f} ms  p99 {g99 - d99:7.2f} ms (client side, at {conc} in flight)")
        time.sleep(2.5)
        inner = [a - b for a, b in RequestLog.objects.filter(deployment=dep, id__gt=first_id)
                 .values_list("latency_ms", "upstream_ms") if a is not None and b is not None]
        in50, in99 = _pct(inner, 50), _pct(inner, 99)
        print(f"inside the gateway (latency - upstream, {len(inner):,} logged): p50 {in50:.2f} ms  p99 {in99:.2f} ms")

        hold = _loadgen(gw_url, key, 0, conc, hold_s)
        rps = len(hold["lat"]) / hold["wall"]
        print(f"held {rps:,.0f} req/s for {hold['wall']:.0f} s through the gateway, {hold['errors']} errors")

        rss = [gw.memory_info().rss / 1e6]
        soak = subprocess.Popen([sys.executable, __file__, "--loadgen", gw_url, key, "0", str(conc), str(soak_s)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        while soak.poll() is None:
            time.sleep(1.0)
            rss.append(gw.memory_info().rss / 1e6)
        soak_out = json.loads(soak.stdout.read().strip().splitlines()[-1])
        time.sleep(2.5)
        rss.append(gw.memory_info().rss / 1e6)
        # Growth: the last quarter's mean against the second quarter's (after warm-up).
        q = max(1, len(rss) // 4)
        growth = sum(rss[-q:]) / q - sum(rss[q:2 * q]) / q
        print(f"soak {soak_s} s: {len(soak_out['lat']):,} requests, {soak_out['errors']} errors; gateway RSS "
              f"{rss[0]:.0f} -> {rss[-1]:.0f} MB (peak {max(rss):.0f}, growth {growth:+.1f} MB)")
        logged = RequestLog.objects.filter(deployment=dep).count()
        print(f"request logs written: {logged:,}")
        print(json.dumps({
            "overhead_p50_ms": round(g50 - d50, 3), "overhead_p99_ms": round(g99 - d99, 3),
            "direct_p50_ms": round(d50, 3), "direct_p99_ms": round(d99, 3), "gateway_p50_ms": round(g50, 3),
            "gateway_p99_ms": round(g99, 3), "inside_p50_ms": round(in50, 3), "inside_p99_ms": round(in99, 3),
            "concurrency": conc, "rps": round(rps, 1), "errors": via["errors"] + hold["errors"] + soak_out["errors"],
            "rss_start_mb": round(rss[0], 1), "rss_end_mb": round(rss[-1], 1), "rss_peak_mb": round(max(rss), 1),
            "rss_growth_mb": round(growth, 1), "requests_logged": logged, "cpu_cores": os.cpu_count()}))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        team.delete()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        _loadgen_main()
    else:
        main()
