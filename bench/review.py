"""Review queue speed with a large database: p95 server time of loading the next queue item and
of saving a decision (target <= 100 ms each), plus the curated export's rows/s.

    python bench/review.py            # 1,000,000 samples
    python bench/review.py --quick    # 100,000 samples (about a minute)

Uses a dedicated database, ``<your database>_bench`` (created if missing, migrated, filled once
with psycopg COPY and reused while the sample count matches). Times are measured around Django's
test client (the full request: middleware, session, queries, template), without a network.
Prints the figures, then as its last line one JSON object with ``p95_ms_next``,
``p95_ms_decide``, ``p50_ms_next``, ``p50_ms_decide``, ``samples``, ``export_rows_per_s``,
``export_first_byte_ms``."""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up", "exchange_rate", "top_up_failed"]
WORDS = ("card account refund transfer money app payment pending declined cash atm pin top-up exchange "
         "rate fee balance statement blocked stolen lost arrive week days still waiting why").split()


def _bench_db_url() -> str:
    import dj_database_url

    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/distillhub")
    cfg = dj_database_url.parse(base)
    name = cfg["NAME"] + "_bench"
    import psycopg

    admin = psycopg.connect(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432, user=cfg["USER"] or "postgres",
                            password=cfg.get("PASSWORD") or None, dbname="postgres", autocommit=True)
    if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
        admin.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    auth = cfg["USER"] or "postgres"
    if cfg.get("PASSWORD"):
        auth += ":" + cfg["PASSWORD"]
    return f"postgres://{auth}@{cfg['HOST'] or '127.0.0.1'}:{cfg['PORT'] or 5432}/{name}"


def _load(n: int, project, teacher, run) -> None:
    """Fill ``n`` queries and ``n`` samples with COPY: 30 % rejected (a mix of failed checks),
    68 % accepted, 2 % failed; soft labels on half of them; audit flags drawn as the service does."""
    from django.db import connection

    from projects.services.review import audit_selected

    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    with connection.cursor() as c:
        c.execute("TRUNCATE projects_reviewdecision, projects_sample, projects_query RESTART IDENTITY CASCADE")
    raw = connection.connection
    t0 = time.perf_counter()
    with raw.cursor() as cur:
        with cur.copy("COPY projects_query (id, project_id, text, text_hash, split, golden, metadata, created_at) FROM STDIN") as cp:
            for i in range(1, n + 1):
                text = f"#{i} " + " ".join(rng.choices(WORDS, k=rng.randint(6, 18)))
                r = rng.random()
                split = "train" if r < 0.8 else ("validation" if r < 0.9 else "test")
                cp.write_row((i, project.pk, text, f"{i:064x}", split, False, "{}", now))
        checks_sets = [
            [("label_in_set", "not one of the labels")], [("max_length", "answer is 900 characters, limit 200")],
            [("refusal", "the answer refuses")], [("label_in_set", "not one of the labels"), ("truncated", "finish_reason=length")],
        ]
        with cur.copy("COPY projects_sample (id, run_id, query_id, teacher_id, sample_index, prompt, response, parsed, "
                      "finish_reason, input_tokens, output_tokens, cost_usd, label_probs, checks, failed_checks, status, "
                      "error, audit, version, created_at) FROM STDIN") as cp:
            for i in range(1, n + 1):
                r = rng.random()
                probs = None
                if rng.random() < 0.5:
                    w = [rng.random() for _ in LABELS]
                    probs = json.dumps({l: round(x / sum(w), 4) for l, x in zip(LABELS, w)})
                if r < 0.30:
                    failed = checks_sets[i % len(checks_sets)]
                    status, resp, parsed = "rejected", rng.choice(["card arival", "I think it is a refund?", "<b>lost</b>"]), None
                elif r < 0.98:
                    failed, status = [], "accepted"
                    resp = rng.choice(LABELS)
                    parsed = json.dumps(resp)
                else:
                    failed, status, resp, parsed = [], "failed", None, None
                checks = [{"name": "non_empty", "passed": True, "reason": ""}] + \
                         [{"name": f, "passed": False, "reason": why} for f, why in failed]
                audit = status == "accepted" and audit_selected(sample_id=i, share=project.review_audit_share)
                cp.write_row((i, run.pk, i, teacher.pk, 0, "[]", resp, parsed, "stop", 120, 3, "0.00001", probs,
                              json.dumps(checks), json.dumps([f for f, _ in failed]), status, "", audit, 0, now))
    with connection.cursor() as c:
        c.execute("SELECT setval(pg_get_serial_sequence('projects_query', 'id'), %s)", [n])
        c.execute("SELECT setval(pg_get_serial_sequence('projects_sample', 'id'), %s)", [n])
        c.execute("ANALYZE projects_query")
        c.execute("ANALYZE projects_sample")
    type(project).objects.filter(pk=project.pk).update(review_audit_marked_upto=n)
    print(f"loaded {n:,} queries and {n:,} samples with COPY in {time.perf_counter() - t0:.1f} s", flush=True)


def _p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 samples instead of 1,000,000")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()
    n = args.samples or (100_000 if args.quick else 1_000_000)

    os.environ["DATABASE_URL"] = _bench_db_url()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    call_command("migrate", verbosity=0)
    from projects.models import GenerationRun, Project, Sample, Teacher
    from projects.services.projects import project_create
    from projects.services.review import curated_dataset_export
    from projects.services.teams import team_create, user_create
    from projects.models import Team

    team = Team.objects.filter(slug="bench-review").first() or team_create(name="Bench review")
    users = []
    for name in ("rev1", "rev2"):
        from django.contrib.auth import get_user_model

        u = get_user_model().objects.filter(username=name).first() or user_create(
            username=name, team=team, role="member", password="bench-password-123")
        users.append(u)
    project = Project.objects.filter(slug="bench-review-project").first() or project_create(
        team=team, name="Bench review project", task_type="classification", labels=LABELS)
    teacher = Teacher.objects.get_or_create(project=project, name="teacher", defaults={"provider": "openai", "model": "x"})[0]
    run = GenerationRun.objects.filter(project=project).first() or GenerationRun.objects.create(project=project)
    have = Sample.objects.filter(run=run).count()
    if have != n:
        _load(n, project, teacher, run)
    else:
        print(f"reusing {n:,} samples in {os.environ['DATABASE_URL'].rsplit('/', 1)[-1]}", flush=True)

    clients = []
    for u in users:
        c = Client()
        c.force_login(u)
        c.get(reverse("review_page", kwargs={"slug": project.slug}))  # warm: session, caches
        clients.append(c)

    next_url = reverse("review_next", kwargs={"slug": project.slug})
    t_next, t_decide = [], []
    rng = random.Random(1)
    for i in range(args.iterations):
        c = clients[i % len(clients)]
        t0 = time.perf_counter()
        r = c.get(next_url, {"mode": "rejected"}, HTTP_HX_REQUEST="true")
        t_next.append((time.perf_counter() - t0) * 1000)
        body = r.content.decode()
        assert r.status_code == 200 and 'data-sample="' in body, body[:500]
        sid = int(body.split('data-sample="', 1)[1].split('"', 1)[0])
        ver = int(body.split('data-version="', 1)[1].split('"', 1)[0])
        decision = rng.choice(["accept", "reject", "reject"])
        t0 = time.perf_counter()
        r = c.post(reverse("review_decide", kwargs={"slug": project.slug, "sample_id": sid}),
                   {"decision": decision, "version": str(ver), "mode": "rejected"}, HTTP_HX_REQUEST="true")
        t_decide.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200 and "sample" in r.content.decode()
    # Filtered queue (by failed check and teacher) too: next item only.
    t_filtered = []
    for i in range(50):
        c = clients[i % len(clients)]
        t0 = time.perf_counter()
        c.get(next_url, {"mode": "rejected", "check": "refusal", "teacher": str(teacher.pk)}, HTTP_HX_REQUEST="true")
        t_filtered.append((time.perf_counter() - t0) * 1000)

    # The page's download: time to the first streamed bytes (a 100,000+ row export starts at once).
    t0 = time.perf_counter()
    r = clients[0].get(reverse("review_export", kwargs={"slug": project.slug}), {"format": "hf-jsonl"})
    it = iter(r.streaming_content)
    first = next(it)
    first_byte_ms = (time.perf_counter() - t0) * 1000
    assert first.startswith(b'{"sample_id":')
    r.close()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = curated_dataset_export(project=project, fmt="openai-chat", path="/tmp/bench-review-export.jsonl")
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    os.unlink("/tmp/bench-review-export.jsonl")

    out = {
        "samples": n, "iterations": args.iterations,
        "p50_ms_next": round(statistics.median(t_next), 2), "p95_ms_next": round(_p(t_next, 0.95), 2),
        "p50_ms_decide": round(statistics.median(t_decide), 2), "p95_ms_decide": round(_p(t_decide, 0.95), 2),
        "p95_ms_next_filtered": round(_p(t_filtered, 0.95), 2),
        "export_rows": res["rows"], "export_rows_per_s": round(res["rows"] / dt, 1),
        "export_peak_rss_growth_mb": round(rss1 - rss0, 1), "export_first_byte_ms": round(first_byte_ms, 1),
    }
    print(f"samples in the database: {n:,}")
    print(f"next queue item:   p50 {out['p50_ms_next']} ms, p95 {out['p95_ms_next']} ms (target <= 100 ms)")
    print(f"save a decision:   p50 {out['p50_ms_decide']} ms, p95 {out['p95_ms_decide']} ms (target <= 100 ms; "
          "includes claiming and rendering the next item)")
    print(f"next item, filtered by check and teacher: p95 {out['p95_ms_next_filtered']} ms")
    print(f"export: {res['rows']:,} rows in {dt:.1f} s ({out['export_rows_per_s']:,} rows/s), "
          f"peak RSS grew {out['export_peak_rss_growth_mb']} MB; page download's first bytes after {out['export_first_byte_ms']} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
