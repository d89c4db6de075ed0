"""Verb: ``evaluate --project SLUG [--split test|golden] [--limit N] [--price-per-hour USD] [--wait]``."""
from __future__ import annotations

from projects.cli import CliError, emit, wait_for_job
from projects.cli.foundation import get_project
from projects.models import Evaluation
from projects.services.evaluation import EVAL_SPLITS, evaluation_api_summary, evaluation_start


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate the students against the teacher(s) on the test split or golden set")
    p.add_argument("--project", required=True)
    p.add_argument("--split", choices=list(EVAL_SPLITS), default="test")
    p.add_argument("--limit", type=int, help="only the first N queries of the split")
    p.add_argument("--price-per-hour", type=float, dest="price_per_hour_usd",
                   help="USD per hour of the machine running local models (default: project setting, else 0.10 CPU / 2.00 GPU)")
    p.add_argument("--wait", action="store_true", help="block until the evaluation ends")
    p.set_defaults(handler=cmd_evaluate)


def _human(out: dict) -> str:
    lines = [f"evaluation {out['evaluation']} ({out['split']}): {out['status']}"]
    for r in out["results"]:
        q = "—" if r["quality"] is None else f"{r['quality']:.3f}"
        ret = "—" if r["quality_retention"] is None else f"{r['quality_retention'] * 100:.1f} %"
        p50 = "—" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']:.1f} ms"
        cost = "—" if r["cost_per_1k_usd"] is None else f"${r['cost_per_1k_usd']:.5f}"
        size = "" if not r.get("size_bytes") else f"  {r['size_bytes'] / 1e6:.0f} MB"
        layers = "" if r.get("layers") is None else f"  {r['layers']} layers"
        preset = "" if not r.get("student_size") else f"  [{r['student_size']}]"
        speed = "" if r.get("speedup") is None else f"  speed-up {r['speedup']:.1f}x"
        lines.append(f"  {r['role']:8} {r['model']:40} quality {q}  retention {ret}  p50 {p50}  per 1K {cost}"
                     f"{size}{layers}{speed}{preset}")
    if out.get("verdict"):
        lines.append(f"verdict: {out['verdict']}")
    return "\n".join(lines)


def cmd_evaluate(o: dict) -> dict:
    project = get_project(o["project"])
    options = {k: o[k] for k in ("limit", "price_per_hour_usd") if o.get(k) is not None}
    ev = evaluation_start(project=project, split=o["split"], options=options)
    if o["wait"]:
        job = wait_for_job(ev.job_id)
        ev = Evaluation.objects.get(pk=ev.pk)
        out = {**evaluation_api_summary(evaluation=ev), "job": job.pk}
        if job.status != "succeeded":
            emit(o, out)
            raise CliError(f"evaluation {ev.pk} (job {job.pk}) ended {job.status}: {job.error.splitlines()[0] if job.error else job.message}")
        out["_human"] = _human(out)
        return out
    return {**evaluation_api_summary(evaluation=ev), "job": ev.job_id}
