"""Generation runs, the worker floor: the coordinator and chunk tasks' bodies (called by the
tasks in workers/tasks.py). Starting, cancelling and resuming a run, and the run's counters, are
request-side code in ``projects.services.generation``.

The coordinator (``generation_coordinate``) splits the run's pending queries into chunks of
``options["chunk_size"]`` queries and queues one ``workers.tasks.generation_chunk_task`` per chunk
by name, so any number of workers can take them; it takes unclaimed chunks itself too (a chunk
is claimed once, with a Redis ``SET NX``), then polls the samples until every (query, teacher)
group is finished. Each sample slot (run, query, teacher, sample_index) is written once: slots
already done are skipped and inserts ignore conflicts.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from projects.models import JOB_ENDED, GenerationRun, Job, JobStatus, Query, Sample, Teacher
from projects.selectors import project_task_spec
from projects.services.generation import (DEFAULT_CHUNK_SIZE, DEFAULT_QUEUE, GenerationStopped,
                                          _configs, _count_done_groups, _effective_n, _group_rows,
                                          _refresh_counters, _run_query_ids, _split_queries, _teacher_config,
                                          judge_model_config)
from projects.services.jobs import task_send

log = logging.getLogger(__name__)

#: Largest pool embedded for a ``diverse`` selection (or twice the run's limit, if more); a larger
#: split is first subsampled (seeded, uniformly) to that many candidates, and the near-duplicate
#: report covers those candidates.
DIVERSE_MAX_CANDIDATES = 20000
#: Near-duplicate groups (and queries per group) kept on the run as examples for its page.
DUPLICATE_EXAMPLE_GROUPS, DUPLICATE_EXAMPLE_SIZE = 5, 3

# On cancel, requests already in flight get this long to finish so answers already paid for
# are kept; then they are dropped. Cancel therefore takes at most ~1 s (the check) + this.
CANCEL_GRACE_S = 2.0


def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL)


def _claim_chunk(job: Job, index: int) -> bool:
    """True for the one worker that claims chunk ``index`` of ``job`` (Redis SET NX). The key
    carries the job's creation time too, so a recreated database never meets old claims."""
    key = f"distillhub:generation:{job.pk}:{int(job.created_at.timestamp() * 1e6)}:chunk:{index}"
    return bool(_redis().set(key, "1", nx=True, ex=7 * 24 * 3600))


def generation_coordinate(*, job: Job, reporter) -> dict:
    """The coordinator task's body (see ``_coordinate``). The run's status is written here, before
    the task ends the job, so a page or script that sees the job ended also sees the run ended."""
    from workers.progress import JobCancelled

    run_id = GenerationRun.objects.filter(job=job).values_list("pk", flat=True).first()
    try:
        result = _coordinate(job=job, reporter=reporter)
    except JobCancelled:
        _end_run(run_id, JobStatus.CANCELLED, "cancelled by user")
        raise
    except Exception as exc:
        _end_run(run_id, JobStatus.FAILED, f"Failed: {exc}"[:200])
        raise
    _end_run(run_id, JobStatus.SUCCEEDED, "")
    return result


def _end_run(run_id, status: str, reason: str) -> None:
    if run_id is None:
        return
    run = GenerationRun.objects.get(pk=run_id)
    _refresh_counters(run)
    GenerationRun.objects.filter(pk=run_id).update(status=status, finished_at=timezone.now())
    if reason:
        GenerationRun.objects.filter(pk=run_id, stop_reason="").update(stop_reason=reason)


def _coordinate(*, job: Job, reporter) -> dict:
    """The coordinator task's body: send the pending chunks to the teacher queue, process
    unclaimed ones here, and wait until every group is finished (or the run stops), keeping
    counters and progress current. Returns the summary stored as the job's result. Raises
    GenerationStopped (quota, auth, budget, a chunk's error), JobCancelled on cancel,
    RuntimeError when the other workers stop making progress for ``STALE_JOB_SECONDS``."""
    run = GenerationRun.objects.select_related("project").get(job=job)
    GenerationRun.objects.filter(pk=run.pk).update(status=JobStatus.RUNNING, stop_reason="", finished_at=None)
    task = project_task_spec(run.project)
    configs = _configs(run)
    n_eff = _effective_n(run, task, configs)
    if (run.options or {}).get("selection") == "diverse" and "selected_query_ids" not in run.options:
        reporter.report(0.0, "choosing diverse queries (MiniLM embeddings, k-means)", force=True)
        run.options = select_queries_diverse(run=run)
    qids = _run_query_ids(run)
    if (run.options or {}).get("queries") != len(qids):
        run.options = {**(run.options or {}), "queries": len(qids)}
        GenerationRun.objects.filter(pk=run.pk).update(options=run.options)
    total = len(qids) * len(configs)
    done = {(g["query_id"], g["teacher_id"]) for g in _group_rows(run)
            if g["acc"] > 0 or g["n"] >= n_eff[g["teacher_id"]]}
    pending = [q for q in qids if any((q, t) not in done for t in configs)]
    size = int((run.options or {}).get("chunk_size") or DEFAULT_CHUNK_SIZE)
    chunks = [pending[i:i + size] for i in range(0, len(pending), size)]
    q = (run.options or {}).get("queue") or DEFAULT_QUEUE
    reporter.report(len(done) / total if total else 1.0, f"{len(done)}/{total} done; {len(chunks)} chunk(s) queued", force=True)
    # Later chunks go to the queue for other workers; this worker takes what is left unclaimed.
    for k, chunk in enumerate(chunks[1:], start=1):
        task_send(name="workers.tasks.generation_chunk_task", args=[job.pk, k, chunk], queue=q)
    for k, chunk in enumerate(chunks):
        reporter.check_cancel()
        _raise_if_stopped(run)
        if _claim_chunk(job, k):
            _process_chunk(job, run, chunk, reporter=reporter, total=total, n_eff=n_eff)
    last_done, last_change = -1, time.monotonic()
    stall_s = getattr(settings, "STALE_JOB_SECONDS", 600)
    while True:
        n_done = _count_done_groups(run, n_eff)
        counters = _refresh_counters(run)
        reporter.report(n_done / total if total else 1.0, _progress_message(n_done, total, counters))
        _raise_if_stopped(run)
        reporter.check_cancel()
        if n_done >= total:
            break
        if n_done != last_done:
            last_done, last_change = n_done, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise RuntimeError(f"no sample was written for {stall_s} s while {total - n_done} group(s) remain: "
                               "a worker taking a chunk was probably lost. Resume the run to finish it.")
        time.sleep(0.5)
    counters = _refresh_counters(run)
    return {"run": run.pk, **{k: (float(v) if isinstance(v, Decimal) else v) for k, v in counters.items()},
            "message": _progress_message(total, total, counters)}


def select_queries_diverse(*, run: GenerationRun) -> dict:
    """Choose the run's queries once (``diverse`` selection, ``workers.pipeline.diversity``) and
    store them with the near-duplicate report in ``run.options``; returns the new options.

    Pool: the run's split, by id; over ``max(DIVERSE_MAX_CANDIDATES, 2 * limit)`` queries a
    seeded uniform subsample of that size. ``limit`` missing or not below the pool size: every pool query is
    kept (only the report is new). Stored keys: ``selected_query_ids`` (ascending) and
    ``near_duplicates`` = ``{threshold, scanned, pairs, groups, queries, examples: [[{id, text}]]}``.
    Deterministic for ``options["seed"]``, so a worker killed before the write chooses the same."""
    import numpy as np

    from workers.pipeline.diversity import embed_texts, near_duplicates, select_diverse

    opts = dict(run.options or {})
    seed = int(opts.get("seed") or 0)
    pool = list(_split_queries(run.project, opts.get("split", "train")).order_by("id").values_list("id", "text"))
    # At least twice the limit are kept, so a limit above the cap still gets exactly N queries.
    cap = max(DIVERSE_MAX_CANDIDATES, 2 * int(run.limit or 0))
    if len(pool) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), cap, replace=False))
        pool = [pool[int(i)] for i in keep]
    emb = embed_texts([t for _, t in pool], cache_dir=str(settings.MODEL_CACHE_DIR))
    if run.limit and run.limit < len(pool):
        chosen = [pool[i][0] for i in select_diverse(emb, int(run.limit), seed=seed)]
    else:
        chosen = [q for q, _ in pool]
    report = near_duplicates(emb, threshold=float(opts.get("duplicate_threshold") or 0.95))
    opts["selected_query_ids"] = sorted(chosen)
    opts["near_duplicates"] = {
        "threshold": report.threshold, "scanned": len(pool), "pairs": len(report.pairs), "groups": len(report.groups),
        "queries": sum(len(g) for g in report.groups),
        "examples": [[{"id": pool[i][0], "text": pool[i][1][:300]} for i in g[:DUPLICATE_EXAMPLE_SIZE]]
                     for g in report.groups[:DUPLICATE_EXAMPLE_GROUPS]]}
    opts["queries"] = len(chosen)
    # Written once: a second coordinator (a redelivered message) keeps the first selection.
    with transaction.atomic():
        current = GenerationRun.objects.select_for_update().get(pk=run.pk)
        if "selected_query_ids" in (current.options or {}):
            return current.options
        GenerationRun.objects.filter(pk=run.pk).update(options=opts)
    return opts


def _progress_message(done: int, total: int, c: dict) -> str:
    return (f"{done}/{total} queries done · {c.get('accepted', 0)} accepted · {c.get('rejected', 0)} rejected · "
            f"{c.get('failed', 0)} failed · ${float(c.get('cost_usd') or 0):.4f}")


def _raise_if_stopped(run: GenerationRun) -> None:
    reason = GenerationRun.objects.filter(pk=run.pk).values_list("stop_reason", flat=True).first()
    if reason:
        raise GenerationStopped(reason)


def generation_chunk_take(*, job_id: int, index: int, query_ids: list[int]) -> None:
    """A chunk task's body: process chunk ``index`` if its job is still running and no other
    worker claimed it; otherwise do nothing (a redelivered or stale message)."""
    from workers.progress import JobReporter

    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status != JobStatus.RUNNING or job.cancel_requested:
        return
    run = GenerationRun.objects.select_related("project").filter(job=job).first()
    if run is None or run.stop_reason:
        return
    if not _claim_chunk(job, index):
        return
    task = project_task_spec(run.project)
    try:
        _process_chunk(job, run, query_ids, reporter=JobReporter(job_id), total=None,
                       n_eff=_effective_n(run, task, _configs(run)))
    except Exception as exc:  # noqa: BLE001 - the coordinator reports it through the run
        log.exception("generation chunk %s of job %s failed", index, job_id)
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"chunk {index} failed: {exc}"[:200])


def _process_chunk(job: Job, run: GenerationRun, query_ids: list[int], *, reporter, total: int | None, n_eff: dict) -> None:
    """Answer the unfinished slots of ``query_ids``: the async pipeline runs in a thread, this
    thread writes each finished sample as it arrives, reports progress, and watches for cancel
    and for a stop set by another worker."""
    from workers.pipeline.checks import duplicate_enabled, normalise_for_duplicate
    from workers.pipeline.generation import Generator
    from workers.pipeline.teachers import RunStopped

    task = project_task_spec(run.project)
    configs = _configs(run)
    groups = _chunk_groups(run, query_ids, configs=configs, n_eff=n_eff)
    if not groups:
        return
    try:
        clients, judge = _chunk_clients(run, task)
    except RunStopped as exc:
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"{exc.reason}: {exc}"[:200])
        return
    seen: set[str] = set()
    if duplicate_enabled(task):
        seen = {normalise_for_duplicate(r) for r in Sample.objects.filter(run=run, status="accepted")
                .exclude(response=None).values_list("response", flat=True).iterator()}
    out: queue.Queue = queue.Queue()
    spent = float(GenerationRun.objects.filter(pk=run.pk).values_list("cost_usd", flat=True).first() or 0)
    gen = Generator(task, clients, configs, emit=out.put, samples_per_query=run.samples_per_query,
                    concurrency=run.concurrency, budget_usd=float(run.budget_usd) if run.budget_usd is not None else None,
                    spent_usd=spent, judge=judge, seen=seen)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            asyncio.run(gen.run(groups))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writing thread
            failure.append(exc)

    th = threading.Thread(target=loop, name=f"generation-{job.pk}", daemon=True)
    th.start()
    _write_while_running(job, run, gen, th, out, reporter=reporter, total=total, n_eff=n_eff)
    if failure:
        raise failure[0]
    if gen.stop_reason and gen.stop_reason not in ("cancelled", "stopped"):
        GenerationRun.objects.filter(pk=run.pk, stop_reason="").update(stop_reason=f"{gen.stop_reason}: {gen.stop_message}"[:200])


def _chunk_groups(run: GenerationRun, query_ids: list[int], *, configs: dict, n_eff: dict) -> list:
    """The (query, teacher) groups of ``query_ids`` still unfinished, each starting at its next
    free sample index."""
    from workers.pipeline.generation import Group
    from workers.pipeline.specs import QueryItem

    texts = dict(Query.objects.filter(pk__in=query_ids).values_list("id", "text"))
    state = {(g["query_id"], g["teacher_id"]): g for g in _group_rows(run, query_ids)}
    groups = []
    for qid in query_ids:
        if qid not in texts:
            continue
        for tid in configs:
            g = state.get((qid, tid))
            if g and (g["acc"] > 0 or g["n"] >= n_eff[tid]):
                continue
            groups.append(Group(QueryItem(qid, texts[qid]), tid, (g["mx"] + 1) if g else 0))
    return groups


def _chunk_clients(run: GenerationRun, task) -> tuple[dict, object]:
    """``({teacher id: client}, judge client or None)``; raises RunStopped when a teacher's
    settings are refused now, the judge teacher is missing or the judge model is refused."""
    from workers.pipeline.teachers import RunStopped, make_client

    clients = {tid: make_client(cfg, labels=task.labels, task_type=task.task_type)
               for tid, cfg in _configs(run, resolve=True).items()}
    judge = None
    judge_name = (task.checks or {}).get("judge_teacher")
    if judge_name:
        jt = Teacher.objects.filter(project=run.project, name=judge_name).first()
        if jt is None:
            raise RunStopped("judge_missing", f"checks.judge_teacher: no teacher named {judge_name!r}")
        judge = make_client(_teacher_config(jt, resolve=True), labels=(), task_type="generation")
    elif (task.checks or {}).get("judge_model"):
        judge = make_client(judge_model_config(project=run.project, ref=task.checks["judge_model"]), labels=(),
                            task_type="generation")
    return clients, judge


def _write_while_running(job: Job, run: GenerationRun, gen, th: threading.Thread, out: queue.Queue, *, reporter,
                         total: int | None, n_eff: dict) -> None:
    """Write the generator's samples as they arrive until its thread ends, reporting progress
    and stopping it on cancel or on a stop set by another worker; on the way out (also on an
    error) stop a still-running generator and write what is left."""
    last_check = 0.0
    try:
        while True:
            batch = []
            try:
                batch.append(out.get(timeout=0.2))
                while len(batch) < 200:
                    batch.append(out.get_nowait())
            except queue.Empty:
                pass
            if batch:
                _write_samples(run, batch)
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                row = GenerationRun.objects.filter(pk=run.pk).values("stop_reason", "cost_usd").first() or {}
                jrow = Job.objects.filter(pk=job.pk).values("status", "cancel_requested").first() or {}
                if jrow.get("cancel_requested") or jrow.get("status") in JOB_ENDED:
                    gen.stop("cancelled", "cancelled by user", grace_s=CANCEL_GRACE_S)
                elif row.get("stop_reason"):
                    gen.stop("stopped", row["stop_reason"], grace_s=CANCEL_GRACE_S)
                if gen.budget_usd is not None and row.get("cost_usd") is not None:
                    gen.sync_spent(float(row["cost_usd"]))
                if total:
                    n_done = _count_done_groups(run, n_eff)
                    reporter.report(n_done / total, _progress_message(n_done, total, _refresh_counters(run)))
                else:
                    reporter.report()
            if not th.is_alive() and out.empty():
                break
    finally:
        if th.is_alive():
            gen.stop("cancelled", "the worker stopped")
            th.join(timeout=30)
        rest = []
        while not out.empty():
            rest.append(out.get_nowait())
        if rest:
            _write_samples(run, rest)


def _write_samples(run: GenerationRun, results: list) -> int:
    """Insert finished samples once per slot (existing slots are skipped, conflicts ignored) and
    add the new ones to the run's live counters. Returns how many rows were new."""
    keys = {(r.query_id, r.teacher_id, r.sample_index) for r in results}
    with transaction.atomic():
        existing = set(Sample.objects.filter(run=run, query_id__in={k[0] for k in keys})
                       .values_list("query_id", "teacher_id", "sample_index"))
        new, seen = [], set()
        for r in results:
            k = (r.query_id, r.teacher_id, r.sample_index)
            if k in existing or k in seen:
                continue
            seen.add(k)
            new.append(r)
        Sample.objects.bulk_create([
            Sample(run=run, query_id=r.query_id, teacher_id=r.teacher_id, sample_index=r.sample_index, prompt=r.prompt,
                   response=r.response, parsed=r.parsed, finish_reason=(r.finish_reason or "")[:40],
                   input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                   cost_usd=Decimal(str(round(r.cost_usd, 8))), latency_ms=r.latency_ms, label_probs=r.label_probs,
                   token_logprobs=r.token_logprobs, checks=r.checks, failed_checks=r.failed_checks, status=r.status,
                   error=r.error or "")
            for r in new], ignore_conflicts=True)
        if new:
            GenerationRun.objects.filter(pk=run.pk).update(
                accepted=F("accepted") + sum(r.status == "accepted" for r in new),
                rejected=F("rejected") + sum(r.status == "rejected" for r in new),
                failed=F("failed") + sum(r.status == "failed" for r in new),
                input_tokens=F("input_tokens") + sum(r.input_tokens for r in new),
                output_tokens=F("output_tokens") + sum(r.output_tokens for r in new),
                cost_usd=F("cost_usd") + Decimal(str(round(sum(r.cost_usd for r in new), 8))),
            )
    return len(new)
