"""Benchmark: the gateway's overhead, throughput and memory on this machine.

A fast loopback upstream (a raw ASGI app under uvicorn, answering a fixed OpenAI chat completion)
plays the teacher; the gateway (uvicorn, one process) routes every request to it (student share
0) with request logging to Postgres on. A load generator in its own process measures, per request,
the latency of calling the upstream directly and through the gateway: the overhead is the
difference of the percentiles (p50, p99). The gateway's own
view (``latency_ms - upstream_ms`` from its request logs) is printed too. Then it holds the load
for a while (requests per second, errors) and samples the gateway's RSS over a bounded soak.

Two loads: a closed loop keeping 200 requests in flight (saturation: whichever side is slower
queues) and an open loop offering a fixed rate below capacity (by default half the smaller of
the direct and the gateway's closed-loop rates; latency counted from each request's due time),
which is what the gateway adds in normal service (with its p99 per second, to tell a stall of the
gateway from cores taken by other work). It also reports the gateway's CPU time per
request (and the upstream's), which waiting for a core on a shared machine does not inflate. The load generator uses aiohttp (a cheap client, since it shares the cores).

Needs DATABASE_URL like the app (migrated); uses a scratch team it deletes. Prints figures, and as
its last line one JSON object: overhead_p50_ms, overhead_p99_ms, direct_p50_ms, direct_p99_ms,
gateway_p50_ms, gateway_p99_ms, inside_p50_ms, inside_p99_ms, concurrency, rps (held, closed loop),
direct_rps, gateway_closed_rps, open_rate_rps, open_gateway_rps, open_{direct,gateway,overhead}_p50_ms /
_p99_ms, open_errors, gateway_cpu_ms_per_request, upstream_cpu_ms_per_request, errors, rss_start_mb, rss_end_mb, rss_peak_mb, rss_growth_mb, requests_logged,
cpu_cores, loadavg_start, loadavg_end.

    python bench/gateway.py [--quick] [--rate REQ_PER_S] [--profile FILE]
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


PROFILED = """
import cProfile, time, uvicorn
prof = cProfile.Profile(time.process_time)
prof.enable()
uvicorn.run("gateway.app:app", port={port}, log_level="warning", access_log=False)
prof.disable()
prof.dump_stats({out!r})
"""


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


async def _load(url: str, key: str, n: int, concurrency: int, seconds: float | None = None,
                rate: float | None = None) -> tuple[list, int, float]:
    """(latencies in ms, errors, wall seconds). Closed loop (``rate`` None): ``n`` requests (or as
    many as fit in ``seconds``) with ``concurrency`` in flight, each sent when one ends. Open loop
    (``rate`` req/s): one request every 1/rate s for ``seconds`` whatever the answers do, each
    latency counted from the moment it was due (so a stalled server cannot hide its queue:
    no coordinated omission)."""
    import aiohttp

    body = json.dumps({"model": os.environ.get("BENCH_MODEL", "bench-gw"),
                       "messages": [{"role": "user", "content": "where is my card?"}]}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    lat: list[float] = []
    at: list[float] = []  # when each answered request was sent (due), seconds from the start
    errors = [0]
    conn = aiohttp.TCPConnector(limit=0 if rate else concurrency * 2)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def one(t0: float) -> None:
            try:
                async with client.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except Exception:  # noqa: BLE001 - counted
                ok = False
            if ok:
                lat.append((time.perf_counter() - t0) * 1000.0)
                at.append(t0 - start)
            else:
                errors[0] += 1

        t0 = start = time.perf_counter()
        if rate:
            tasks, i = [], 0
            while True:
                due = t0 + i / rate
                if due - t0 >= seconds:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                tasks.append(asyncio.create_task(one(due)))
                i += 1
            await asyncio.gather(*tasks)
        else:
            left = [n]
            stop_at = t0 + seconds if seconds else None

            async def worker():
                while (left[0] > 0) if stop_at is None else (time.perf_counter() < stop_at):
                    left[0] -= 1
                    await one(time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors[0], time.perf_counter() - t0, at


def _pct(xs, q):
    from gateway.routing import percentile

    return percentile(xs, q)


def _loadgen_main() -> None:
    """Child process: ``--loadgen URL KEY N CONCURRENCY SECONDS RATE OUT`` writes one JSON object to OUT
    (a file: a pipe would fill up and block it while the parent samples memory)."""
    url, key, n, conc, secs, rate = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), \
        float(sys.argv[7])
    lat, errors, wall, at = asyncio.run(_load(url, key, n, conc, secs or None, rate or None))
    Path(sys.argv[8]).write_text(json.dumps({"lat": lat, "errors": errors, "wall": wall, "at": at}))


def _loadgen_start(url: str, key: str, n: int, conc: int, secs: float = 0, rate: float = 0):
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_loadgen_{os.getpid()}_{time.monotonic_ns()}.json"
    proc = subprocess.Popen([sys.executable, __file__, "--loadgen", url, key, str(n), str(conc), str(secs), str(rate),
                             str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    return proc, out


def _loadgen_result(proc, out: Path) -> dict:
    err = proc.communicate()[1]
    if proc.returncode:
        raise SystemExit(err[-2000:])
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _loadgen(url: str, key: str, n: int, conc: int, secs: float = 0, rate: float = 0) -> dict:
    return _loadgen_result(*_loadgen_start(url, key, n, conc, secs, rate))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about two minutes: fewer requests, shorter phases")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open-loop offered rate in req/s (default: half the direct closed-loop capacity)")
    ap.add_argument("--profile", metavar="FILE", help="run the gateway under cProfile and write its stats to FILE")
    args = ap.parse_args()
    n = 4000 if args.quick else 20000
    open_s = 10 if args.quick else 30
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

    from projects.models import RequestLog
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create
    from projects.services.projects import project_create
    from projects.services.teams import team_create

    procs = []
    load_start = os.getloadavg()[0]
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
        os.environ["BENCH_MODEL"] = dep.slug  # the model the load generator asks for
        _, key = gateway_key_create(team=team, name="bench")
        env = dict(os.environ, GATEWAY_REFRESH_S="2")
        if args.profile:  # CPU time, not wall time: on a shared machine waiting for a core is not cost
            cmd = ["-c", PROFILED.format(port=gw_port, out=str(Path(args.profile).resolve()))]
        else:
            cmd = ["-m", "uvicorn", "gateway.app:app", "--port", str(gw_port), "--log-level", "warning",
                   "--no-access-log"]
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, start_new_session=True))
        _wait(f"http://127.0.0.1:{gw_port}/healthz", procs[-1])
        gw = psutil.Process(procs[-1].pid)
        up = psutil.Process(procs[0].pid)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        gw_url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        print(f"cpu cores {os.cpu_count()}, load average {load_start:.1f} at the start (the load generator, the "
              f"upstream and the gateway share these cores); {n:,} requests at {conc} in flight; open loop "
              f"{open_s} s; hold {hold_s} s; soak {soak_s} s", flush=True)

        _loadgen(direct_url, key, 500, conc)  # warm-up
        _loadgen(gw_url, key, 500, conc)

        print(f"\n-- closed loop, {conc} in flight (saturation) --")
        upc0 = up.cpu_times()
        direct = _loadgen(direct_url, key, n, conc)
        upc1 = up.cpu_times()
        up_cpu_ms = ((upc1.user + upc1.system) - (upc0.user + upc0.system)) * 1000.0 / max(1, len(direct["lat"]))
        first_id = RequestLog.objects.filter(deployment=dep).order_by("-id").values_list("id", flat=True).first() or 0
        cpu0 = gw.cpu_times()
        via = _loadgen(gw_url, key, n, conc)
        cpu1 = gw.cpu_times()
        # CPU the gateway spent per request (user + system): unlike latency, not inflated by waiting
        # for a core on a shared machine; the upstream's own, measured the same way, for scale.
        gw_cpu_ms = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) * 1000.0 / max(1, len(via["lat"]))
        d50, d99 = _pct(direct["lat"], 50), _pct(direct["lat"], 99)
        g50, g99 = _pct(via["lat"], 50), _pct(via["lat"], 99)
        direct_rps = len(direct["lat"]) / direct["wall"]
        via_rps = len(via["lat"]) / via["wall"]
        print(f"direct   p50 {d50:7.2f} ms  p99 {d99:7.2f} ms  ({direct_rps:.0f} req/s, {direct['errors']} errors)")
        print(f"gateway  p50 {g50:7.2f} ms  p99 {g99:7.2f} ms  ({via_rps:.0f} req/s, {via['errors']} errors)")
        print(f"overhead p50 {g50 - d50:7.2f} ms  p99 {g99 - d99:7.2f} ms (client side)")
        time.sleep(2.5)
        inner = [a - b for a, b in RequestLog.objects.filter(deployment=dep, id__gt=first_id)
                 .values_list("latency_ms", "upstream_ms") if a is not None and b is not None]
        in50, in99 = _pct(inner, 50), _pct(inner, 99)
        print(f"inside the gateway (latency - upstream, {len(inner):,} logged): p50 {in50:.2f} ms  p99 {in99:.2f} ms")
        print(f"CPU per request: gateway {gw_cpu_ms:.3f} ms, upstream {up_cpu_ms:.3f} ms "
              f"(one core serves at most {1000 / gw_cpu_ms:,.0f} gateway requests per second)")

        # Below capacity: half of what either side held in the closed loop (the gateway does the
        # upstream's server work plus a client call and logging, so it is the smaller one).
        rate = args.rate or round(min(direct_rps, via_rps) / 2)
        print(f"\n-- open loop, {rate:.0f} req/s offered for {open_s} s "
              f"({'given' if args.rate else 'half the closed-loop capacity'}) --")
        o_direct = _loadgen(direct_url, key, 0, conc, open_s, rate)
        o_via = _loadgen(gw_url, key, 0, conc, open_s, rate)
        od50, od99 = _pct(o_direct["lat"], 50), _pct(o_direct["lat"], 99)
        og50, og99 = _pct(o_via["lat"], 50), _pct(o_via["lat"], 99)
        o_rps = len(o_via["lat"]) / o_via["wall"]
        print(f"direct   p50 {od50:7.2f} ms  p99 {od99:7.2f} ms  ({o_direct['errors']} errors)")
        print(f"gateway  p50 {og50:7.2f} ms  p99 {og99:7.2f} ms  ({o_rps:.0f} req/s answered, {o_via['errors']} errors)")
        print(f"overhead p50 {og50 - od50:7.2f} ms  p99 {og99 - od99:7.2f} ms (client side, from each request's due time)")
        by_s: dict[int, list] = {}
        for t, ms in zip(o_via["at"], o_via["lat"]):
            by_s.setdefault(int(t), []).append(ms)
        print("gateway p99 per second: " + " ".join(f"{_pct(v, 99):.0f}" for _, v in sorted(by_s.items())) + " ms")

        hold = _loadgen(gw_url, key, 0, conc, hold_s)
        rps = len(hold["lat"]) / hold["wall"]
        print(f"\nheld {rps:,.0f} req/s for {hold['wall']:.0f} s through the gateway at {conc} in flight, "
              f"{hold['errors']} errors")

        rss = [gw.memory_info().rss / 1e6]
        soak = _loadgen_start(gw_url, key, 0, conc, soak_s)
        while soak[0].poll() is None:
            time.sleep(1.0)
            rss.append(gw.memory_info().rss / 1e6)
        soak_out = _loadgen_result(*soak)
        time.sleep(2.5)
        rss.append(gw.memory_info().rss / 1e6)
        # Growth: the last quarter's mean against the second quarter's (after warm-up).
        q = max(1, len(rss) // 4)
        growth = sum(rss[-q:]) / q - sum(rss[q:2 * q]) / q
        print(f"soak {soak_s} s: {len(soak_out['lat']):,} requests, {soak_out['errors']} errors; gateway RSS "
              f"{rss[0]:.0f} -> {rss[-1]:.0f} MB (peak {max(rss):.0f}, growth {growth:+.1f} MB)")
        logged = RequestLog.objects.filter(deployment=dep).count()
        load_end = os.getloadavg()[0]
        print(f"request logs written: {logged:,}; load average {load_end:.1f} at the end")
        result = {
            "overhead_p50_ms": round(g50 - d50, 3), "overhead_p99_ms": round(g99 - d99, 3),
            "direct_p50_ms": round(d50, 3), "direct_p99_ms": round(d99, 3), "gateway_p50_ms": round(g50, 3),
            "gateway_p99_ms": round(g99, 3), "inside_p50_ms": round(in50, 3), "inside_p99_ms": round(in99, 3),
            "concurrency": conc, "rps": round(rps, 1), "direct_rps": round(direct_rps, 1),
            "gateway_closed_rps": round(via_rps, 1),
            "open_rate_rps": rate, "open_gateway_rps": round(o_rps, 1),
            "open_direct_p50_ms": round(od50, 3), "open_direct_p99_ms": round(od99, 3),
            "open_gateway_p50_ms": round(og50, 3), "open_gateway_p99_ms": round(og99, 3),
            "open_overhead_p50_ms": round(og50 - od50, 3), "open_overhead_p99_ms": round(og99 - od99, 3),
            "open_errors": o_via["errors"], "gateway_cpu_ms_per_request": round(gw_cpu_ms, 3),
            "upstream_cpu_ms_per_request": round(up_cpu_ms, 3),
            "errors": via["errors"] + hold["errors"] + soak_out["errors"] + o_via["errors"],
            "rss_start_mb": round(rss[0], 1), "rss_end_mb": round(rss[-1], 1), "rss_peak_mb": round(max(rss), 1),
            "rss_growth_mb": round(growth, 1), "requests_logged": logged, "cpu_cores": os.cpu_count(),
            "loadavg_start": round(load_start, 2), "loadavg_end": round(load_end, 2)}
    finally:
        for i, p in enumerate(procs):
            try:
                # SIGINT lets uvicorn shut down cleanly, so cProfile writes its stats.
                os.killpg(p.pid, signal.SIGINT if (args.profile and i == 1) else signal.SIGTERM)
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001
                pass
        team.delete()
    if args.profile:
        import pstats

        print(f"\n-- gateway profile ({args.profile}), top 30 by own time --")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        _loadgen_main()
    else:
        main()
