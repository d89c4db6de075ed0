"""Verbs: ``teacher add``, ``generate`` (see ../shared/CONTRACT.md)."""
from __future__ import annotations

from projects.cli import CliError, finish_job
from projects.cli.foundation import get_project
from projects.models import GenerationRun, Teacher
from projects.services.generation import SELECTIONS, SPLITS
from workers.pipeline.training import PRESET_NAMES


def register(sub) -> None:
    teacher = sub.add_parser("teacher", help="teachers").add_subparsers(dest="action", required=True)
    p = teacher.add_parser("add", help="add a teacher to a project")
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--provider", required=True, choices=Teacher.Provider.values)
    p.add_argument("--model", default="", help="API model name, or a local model (bundled name, Hugging Face id "
                   "org/name, artifact:ID of this project)")
    p.add_argument("--base-url", default="", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 "
                   "(loopback/private addresses need the operator's DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS)")
    p.add_argument("--api-key-env", default="", help="NAME of the environment variable holding the API key "
                   "(one of the operator's DISTILLHUB_TEACHER_KEY_ENVS)")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--top-logprobs", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--price-in", type=float, default=0.0, help="USD per 1M input tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="USD per 1M output tokens")
    p.add_argument("--member", action="append", default=[], help="ensemble member teacher name (repeat)")
    p.set_defaults(handler=cmd_teacher_add)

    p = teacher.add_parser("tune", help="domain-tune a local teacher on the project's golden references "
                                        "(gpu queue), then register it as a new teacher")
    p.add_argument("--project", required=True)
    p.add_argument("--teacher", required=True, help="a local (transformers) teacher of the project")
    p.add_argument("--name", default="", help="name of the tuned teacher (default: <teacher>-tuned)")
    p.add_argument("--method", default="sft-lora", choices=["sft-lora", "sft-full"])
    p.add_argument("--preset", default="fast", choices=list(PRESET_NAMES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter (repeatable), e.g. --set max_steps=50")
    p.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if it failed or was cancelled")
    p.set_defaults(handler=cmd_teacher_tune)

    p = sub.add_parser("generate", help="run the teacher(s) over the train queries with rejection sampling")
    p.add_argument("--project", required=True)
    p.add_argument("--teacher", action="append", default=[], help="teacher name (repeat; default: all)")
    p.add_argument("--limit", type=int, default=None, help="only N queries (which N: --select)")
    p.add_argument("--select", default="first", choices=list(SELECTIONS),
                   help="first: the first N by id; diverse: N that cover the queries (MiniLM embeddings, k-means, "
                        "the query nearest each centroid), with a near-duplicate report")
    p.add_argument("--seed", type=int, default=0, help="seed of the diverse selection")
    p.add_argument("--duplicate-threshold", type=float, default=0.95,
                   help="cosine similarity at or above which two queries are near-duplicates (diverse only)")
    p.add_argument("--samples-per-query", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--budget-usd", type=float, default=None)
    p.add_argument("--split", default="train", choices=list(SPLITS))
    p.add_argument("--resume", type=int, default=None, metavar="RUN", help="resume run RUN instead of starting one")
    p.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if it failed or was cancelled")
    p.set_defaults(handler=cmd_generate)


def cmd_teacher_add(o: dict) -> dict:
    from projects.services.generation import teacher_create

    project = get_project(o["project"])
    t = teacher_create(project=project, name=o["name"], provider=o["provider"], model=o["model"], base_url=o["base_url"],
                       api_key_env=o["api_key_env"], temperature=o["temperature"], max_tokens=o["max_tokens"],
                       top_logprobs=o["top_logprobs"], price_in_per_1m=o["price_in"], price_out_per_1m=o["price_out"],
                       members=o["member"] or None, timeout_s=o["timeout"])
    return {"teacher": t.name, "id": t.pk, "provider": t.provider, "model": t.model}


def cmd_teacher_tune(o: dict) -> dict:
    """``teacher tune``: prints the training run's keys (``run``, ``job``, ``status``,
    ``train_loss``, ``artifacts``, ...) plus ``teacher`` (the tuned teacher's name, once the run
    succeeded; null before) and ``model`` (its ``artifact:ID``)."""
    from projects.cli.training import overrides_from_sets, run_summary as training_summary
    from projects.models import TrainingRun
    from projects.services.training import teacher_tune_start

    project = get_project(o["project"])
    run = teacher_tune_start(project=project, teacher=o["teacher"], method=o["method"], preset=o["preset"],
                             overrides=overrides_from_sets(o["set"]), name=o["name"])

    def summary() -> dict:
        t = Teacher.objects.filter(project=project, options__tuned_by_run=run.pk).first()
        return {**training_summary(run), "teacher": t.name if t else None, "model": t.model if t else None}

    return finish_job(o, run.job_id, summary, f"teacher tuning run {run.pk}",
                      lambda: TrainingRun.objects.get(pk=run.pk).stop_reason)


def run_summary(run: GenerationRun) -> dict:
    """The JSON keys of ``generate``: run, job, status, counters, tokens, cost (USD)."""
    run.refresh_from_db()
    job = run.job
    return {"run": run.pk, "job": job.pk if job else None, "status": job.status if job else run.status,
            "accepted": run.accepted, "rejected": run.rejected, "failed": run.failed,
            "input_tokens": run.input_tokens, "output_tokens": run.output_tokens, "cost_usd": float(run.cost_usd),
            "stop_reason": run.stop_reason, "selection": (run.options or {}).get("selection", "first"),
            "queries": (run.options or {}).get("queries"),
            "near_duplicates": {k: v for k, v in ((run.options or {}).get("near_duplicates") or {}).items()
                                if k != "examples"} or None}


def cmd_generate(o: dict) -> dict:
    from projects.services.generation import generation_resume, generation_start

    project = get_project(o["project"])
    if o["resume"]:
        run = GenerationRun.objects.filter(pk=o["resume"], project=project).first()
        if run is None:
            raise CliError(f"--resume: no generation run {o['resume']} in project {project.slug}")
        run = generation_resume(run=run, budget_usd=o["budget_usd"])
    else:
        run = generation_start(project=project, teachers=o["teacher"] or None, limit=o["limit"],
                               samples_per_query=o["samples_per_query"], concurrency=o["concurrency"],
                               budget_usd=o["budget_usd"], split=o["split"], selection=o["select"],
                               seed=o["seed"], duplicate_threshold=o["duplicate_threshold"])
    return finish_job(o, run.job.pk, lambda: run_summary(run), f"generation run {run.pk}",
                      lambda: GenerationRun.objects.get(pk=run.pk).stop_reason)
