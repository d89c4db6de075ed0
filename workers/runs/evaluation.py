"""Evaluations, the worker floor: the body of ``evaluation_task`` (``evaluation_run``) and the
charts it stores (``evaluation_charts``). Queueing an evaluation is request-side code in
``projects.services.evaluation``, whose docstring describes what a run measures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from projects.models import (
    Evaluation, EvalPrediction, EvalResult, GenerationRun, Job, JobStatus, ModelArtifact, Project, Sample, Teacher,
    TrainingRun,
)
from projects.charts import (eval_confusion_matrix, eval_history, eval_latency_distributions, eval_quality_by_model,
                             eval_quality_vs_cost, eval_training_loss)
from projects.selectors import project_task_spec
from projects.services import InvalidInput, InvalidState
from projects.services.evaluation import evaluation_queries
from projects.services.security import (artifact_folder, model_ref_resolve, project_model_policy,
                                        teacher_endpoint_check)
from workers.pipeline import evaluation as P
from workers.pipeline import metrics as M
from workers.pipeline.local_lm import LocalCausalLM, pick_device
from workers.pipeline.specs import QueryItem

CAUSAL_KINDS = ("merged", "adapter", "int8")
STUDENT_KINDS = CAUSAL_KINDS + ("classifier",)
DEFAULT_PRICE_PER_HOUR_USD = {"cpu": 0.10, "cuda": 2.00}


def _teacher_run(project: Project, split: str, query_ids: list[int]) -> GenerationRun | None:
    """The newest succeeded generation run over ``split`` that asked each of its teachers every
    query of ``query_ids`` (a sample exists for each (query, teacher), whatever its status), or
    None. A run that skipped some of them (``--limit``, queries imported after it) is not reused:
    its missing answers would count as the teacher's mistakes."""
    from django.db.models import Count

    n = len(set(query_ids))
    runs = (GenerationRun.objects.filter(project=project, options__split=split, status=JobStatus.SUCCEEDED)
            .order_by("-created_at", "-id"))
    for run in runs:
        asked = dict(Sample.objects.filter(run=run, query_id__in=query_ids).order_by()
                     .values("teacher_id").annotate(n=Count("query_id", distinct=True)).values_list("teacher_id", "n"))
        teacher_ids = set(run.teachers.values_list("id", flat=True)) | set(asked)
        if teacher_ids and all(asked.get(t, 0) >= n for t in teacher_ids):
            return run
    return None


def _original_parsed(samples: list[Sample]) -> dict[int, object]:
    """``{sample id: parsed value before any review}`` for the given samples that a human
    decided: a decision records the parsed value it replaced, so the earliest one holds the
    teacher's own."""
    from projects.models import ReviewDecision

    out: dict[int, object] = {}
    ids = [s.pk for s in samples if s.review_status is not None or s.edited_response is not None]
    for sid, parsed in (ReviewDecision.objects.filter(sample_id__in=ids).order_by("sample_id", "id")
                        .values_list("sample_id", "previous_parsed")):
        out.setdefault(sid, parsed)
    return out


def _teacher_answers(run: GenerationRun, query_ids: list[int]):
    """The run's answers to ``query_ids``: ``(answers, teachers, missing)`` where ``answers`` is
    ``{teacher id: {query id: Sample}}`` (per teacher and query, the lowest sample index whose
    request did not fail), ``teachers`` ``{teacher id: Teacher}`` for every teacher with a sample
    in the run, ``missing`` ``{teacher id: [query ids without an answer]}``. Each Sample's
    ``parsed`` is set back to the teacher's own value where a reviewer edited it."""
    samples = list(Sample.objects.filter(run=run, query_id__in=query_ids).select_related("teacher")
                   .defer("prompt", "token_logprobs", "checks").order_by("teacher_id", "query_id", "sample_index"))
    teachers: dict[int, Teacher] = {}
    answers: dict[int, dict[int, Sample]] = {}
    for s in samples:
        teachers.setdefault(s.teacher_id, s.teacher)
        answers.setdefault(s.teacher_id, {})
        if s.status != "failed":
            answers[s.teacher_id].setdefault(s.query_id, s)
    original = _original_parsed([s for per_q in answers.values() for s in per_q.values()])
    for per_q in answers.values():
        for s in per_q.values():
            if s.pk in original:
                s.parsed = original[s.pk]
    missing = {tid: [q for q in query_ids if q not in answers[tid]] for tid in answers}
    return answers, teachers, missing


def _wait_teacher_run(project: Project, split: str, reporter, limit: int | None = None) -> GenerationRun:
    """Start a generation run over ``split`` and wait for its job, heart-beating meanwhile."""
    try:
        from projects.services import generation as generation_service
    except ImportError:
        raise InvalidState(
            f"no finished teacher run exists for the {split} split and the generation service "
            "(projects.services.generation) is not installed; generate teacher answers for this split first"
        ) from None
    run = generation_service.generation_start(project=project, split=split, limit=limit)
    reporter.report(0.02, f"Generating teacher answers for the {split} split (run {run.pk})", force=True)
    while True:
        job = Job.objects.get(pk=run.job_id)
        if job.ended:
            break
        reporter.report(0.02 + 0.18 * job.progress, f"Teacher run {run.pk}: {job.message}")
        reporter.check_cancel()
        time.sleep(1.0)
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidState(f"the teacher run {run.pk} for the {split} split ended {job.status}: {job.error or job.message}")
    run.refresh_from_db()
    return run


def _price_per_hour(ev: Evaluation, device: str) -> float:
    if ev.options.get("price_per_hour_usd") is not None:
        return float(ev.options["price_per_hour_usd"])
    if ev.project.checks.get("eval_price_per_hour_usd") is not None:
        return float(ev.project.checks["eval_price_per_hour_usd"])
    return DEFAULT_PRICE_PER_HOUR_USD.get(device, DEFAULT_PRICE_PER_HOUR_USD["cpu"])


def _score(task_type: str, labels, outputs: list, pred_labels: list, references: list) -> dict:
    if task_type == "classification":
        return M.classification_metrics(pred_labels, references, labels)
    if task_type == "extraction":
        return M.extraction_metrics(outputs, references)
    return M.text_metrics(outputs, references)


def _cache_dir() -> str:
    """The model cache the pipeline converts bundled models into (the ``MODEL_CACHE_DIR`` setting)."""
    return str(settings.MODEL_CACHE_DIR)


@dataclass
class _Inputs:
    """What every stage of an evaluation reads: the Evaluation, its task, the teacher run and its
    answers, and the queries every model is scored on (in id order)."""

    ev: Evaluation
    project: Project
    task: object
    labels: list
    run: GenerationRun
    teachers: dict
    missing: dict
    by_teacher: dict
    items: list
    qids: list
    gold: list
    has_gold: bool
    excluded: list
    price_h: float


@dataclass
class _Primary:
    """The primary teacher (the best-scoring one) and the references everything is scored on."""

    teacher: Teacher
    outs: list
    labs: list
    probs: list
    references: list
    quality: float


def evaluation_run(*, job: Job, reporter) -> dict:
    """The body of ``evaluation_task``: evaluate, write the rows, return the job's result
    ``{"evaluation", "verdict", "results": n, "message"}``. Raises InvalidState when there are no
    teacher answers for the split (and none can be generated)."""
    inp = _inputs(job, reporter)
    results, primary = _teacher_results(inp)
    student_results, causal_loaded = _student_results(inp, reporter, primary)
    _speedups(results, student_results, primary)
    results += student_results
    spec = _speculative(inp, reporter, primary.teacher, causal_loaded)
    del causal_loaded
    verdict = _finish(inp, results, primary, spec)
    return {"evaluation": inp.ev.pk, "verdict": verdict, "results": len(results), "message": verdict}


def _inputs(job: Job, reporter) -> _Inputs:
    """Mark the evaluation running, find (or generate) the teacher answers and keep the queries
    every teacher answered; records device, price and reference in ``Evaluation.options``."""
    ev = Evaluation.objects.select_related("project").get(pk=job.payload["evaluation_id"])
    project = ev.project
    Evaluation.objects.filter(pk=ev.pk).update(status=JobStatus.RUNNING)
    task = project_task_spec(project)
    labels = list(project.labels or [])
    queries = list(evaluation_queries(project=project, split=ev.split))
    if ev.options.get("limit"):
        queries = queries[: int(ev.options["limit"])]

    all_qids = [q.pk for q in queries]
    run = (_teacher_run(project, ev.split, all_qids)
           or _wait_teacher_run(project, ev.split, reporter, ev.options.get("limit")))
    answers, teachers, missing = _teacher_answers(run, all_qids)
    # Teachers with no answer at all (every request failed) are left out; a query that one of the
    # others could not answer is left out for EVERY model, so teacher quality, student quality and
    # retention all come from the same queries (a missing answer is not a wrong one).
    by_teacher = {tid: per_q for tid, per_q in answers.items() if per_q}
    if not by_teacher:
        raise InvalidState(f"teacher run {run.pk} has no answers on the {ev.split} queries of this evaluation")
    queries = [q for q in queries if all(q.pk in per_q for per_q in by_teacher.values())]
    if not queries:
        raise InvalidState(f"teacher run {run.pk}: no {ev.split} query of this evaluation has an answer from "
                           f"every teacher ({', '.join(sorted(t.name for t in teachers.values()))}); "
                           "resume the run to retry the failed requests")
    kept = {q.pk for q in queries}
    excluded = [q for q in all_qids if q not in kept]
    items = [QueryItem(query_id=q.pk, text=q.text) for q in queries]
    qids = [q.pk for q in queries]
    gold = [q.reference if q.reference not in (None, "") else None for q in queries]
    has_gold = any(g is not None for g in gold)

    device = pick_device()
    price_h = _price_per_hour(ev, device)
    ev.options = {**ev.options, "price_per_hour_usd": price_h, "device": device, "teacher_run": run.pk,
                  "reference": "gold" if has_gold else "teacher"}
    Evaluation.objects.filter(pk=ev.pk).update(options=ev.options)
    return _Inputs(ev=ev, project=project, task=task, labels=labels, run=run, teachers=teachers, missing=missing,
                   by_teacher=by_teacher, items=items, qids=qids, gold=gold, has_gold=has_gold, excluded=excluded,
                   price_h=price_h)


def _teacher_rows(inp: _Inputs) -> list[tuple]:
    """Per teacher ``(teacher, outputs, labels, probs, latencies, sample dict)`` over the queries."""
    task, labels = inp.task, inp.labels
    teacher_rows = []  # (teacher, outputs, labels, probs, latencies, sample dict)
    for tid, per_q in inp.by_teacher.items():
        t = inp.teachers[tid]
        outs, labs, probs, lats = [], [], [], []
        for qid in inp.qids:
            s = per_q.get(qid)
            text = s.response if s else None  # the teacher's own answer, never a reviewer's edit
            outs.append(text)
            if task.task_type == "classification":
                lab = s.parsed if (s and isinstance(s.parsed, str) and s.parsed in labels) else None
                labs.append(lab or (P.prompts.match_label(text, labels) if text else None))
            else:
                labs.append(None)
            probs.append(s.label_probs if s else None)
            lats.append(s.latency_ms if s and s.latency_ms is not None else None)
        teacher_rows.append((t, outs, labs, probs, lats, per_q))
    return teacher_rows


def _teacher_results(inp: _Inputs) -> tuple[list[EvalResult], _Primary]:
    """Score every teacher, pick the primary one and write the teachers' EvalResults (best first)."""
    task = inp.task

    def refs_from(outs, labs):
        if inp.has_gold:
            return inp.gold
        return labs if task.task_type == "classification" else outs

    # The primary teacher: the best-scoring one (its answers are the reference when there is no gold).
    scored_teachers = []
    for row in _teacher_rows(inp):
        t, outs, labs, probs, lats, per_q = row
        m = _score(task.task_type, inp.labels, outs, labs, refs_from(outs, labs))
        scored_teachers.append((m.get(M.headline_metric(task.task_type)) or 0.0, row, m))
    scored_teachers = [scored_teachers[i] for i in P.rank_teachers([x[0] for x in scored_teachers])]
    row = scored_teachers[0][1]
    primary = _Primary(teacher=row[0], outs=row[1], labs=row[2], probs=row[3],
                       references=refs_from(row[1], row[2]), quality=scored_teachers[0][0])

    EvalResult.objects.filter(evaluation=inp.ev).delete()  # a retried task starts clean
    results = [_teacher_result(inp, row, m, quality, primary) for quality, row, m in scored_teachers]
    return results, primary


def _teacher_result(inp: _Inputs, row: tuple, m: dict, quality, primary: _Primary) -> EvalResult:
    """One teacher's EvalResult and EvalPredictions (cost from its prices or compute time)."""
    task, price_h, qids, references = inp.task, inp.price_h, inp.qids, primary.references
    t, outs, labs, probs, lats, per_q = row
    if not inp.has_gold:
        m = _score(task.task_type, inp.labels, outs, labs, references)
        quality = m.get(M.headline_metric(task.task_type))
    sp = M.speed_figures([x for x in lats if x is not None])
    api = t.provider == Teacher.Provider.OPENAI or float(t.price_in_per_1m or 0) or float(t.price_out_per_1m or 0)
    ss = [per_q[q] for q in qids if q in per_q]
    cost, m["cost_basis"] = P.teacher_cost_per_1k(
        api=bool(api), recorded_costs_usd=[float(s.cost_usd or 0) for s in ss],
        input_tokens=[s.input_tokens for s in ss], output_tokens=[s.output_tokens for s in ss],
        price_in_per_1m=float(t.price_in_per_1m), price_out_per_1m=float(t.price_out_per_1m),
        latencies_ms=[x for x in lats if x is not None], price_per_hour_usd=price_h)
    size = None
    if t.provider == Teacher.Provider.TRANSFORMERS and t.model:
        try:
            from workers.pipeline.registry import resolve_model

            name, policy = model_ref_resolve(project=inp.project, ref=t.model, field="model", kinds=("merged",))
            src = resolve_model(name, _cache_dir(), policy=policy)
            size = P.folder_size(src) if Path(src).exists() else None
            m["layers"] = P.model_layers(src)
        except Exception:  # noqa: BLE001 - size is informative only (a refused model is never read)
            size = None
    if task.task_type == "classification":
        m["agreement"] = M.agreement(labs, primary.labs)
    m["teacher_missing"] = len(inp.missing.get(t.pk, []))
    m["mean_input_tokens"] = (sum(s.input_tokens for s in ss) / len(ss)) if ss else None
    m["mean_output_tokens"] = (sum(s.output_tokens for s in ss) / len(ss)) if ss else None
    res = EvalResult.objects.create(
        evaluation=inp.ev, model_name=t.name, role="teacher", teacher=t, metrics=m, quality=quality,
        quality_retention=M.retention(quality, primary.quality), latency_ms_p50=sp["latency_ms_p50"],
        latency_ms_p95=sp["latency_ms_p95"], throughput_qps=sp["throughput_qps"], size_bytes=size,
        cost_per_1k_usd=cost)
    EvalPrediction.objects.bulk_create([
        EvalPrediction(result=res, query_id=qid, output=outs[i] or "", label=labs[i], probs=probs[i],
                       latency_ms=lats[i], correct=_correct(task.task_type, outs[i], labs[i], references[i]))
        for i, qid in enumerate(qids)])
    return res


def _student_results(inp: _Inputs, reporter, primary: _Primary) -> tuple[list[EvalResult], list[tuple]]:
    """Run and score every student; returns their EvalResults and ``[(result, loaded LM)]`` of
    the best causal student (kept in memory for the speculative-decoding measurement)."""
    task = inp.task
    judge = _judge(inp.ev, task) if task.task_type in ("summarization", "generation") else None
    students = _students(inp.project)
    # This project's artifact folders (an adapter's base may be one of them) and its students'
    # base models, nothing else.
    student_policy = project_model_policy(project=inp.project)
    total = max(1, len(students))
    results: list[EvalResult] = []
    causal_loaded: list[tuple[EvalResult, object]] = []
    for k, student in enumerate(students):
        reporter.check_cancel()
        res, lm = _student_result(inp, reporter, student, base_progress=0.2 + 0.7 * k / total, total=total,
                                  judge=judge, policy=student_policy, primary=primary)
        results.append(res)
        if lm is not None:
            causal_loaded.append((res, lm))
            if len(causal_loaded) > 1:  # keep only the best causal student in memory for the draft test
                causal_loaded.sort(key=lambda x: -(x[0].quality or 0))
                causal_loaded = causal_loaded[:1]
    return results, causal_loaded


def _student_result(inp: _Inputs, reporter, student: tuple, *, base_progress: float, total: int, judge, policy,
                    primary: _Primary):
    """Run one student over the queries and write its EvalResult and EvalPredictions; returns
    ``(result, loaded causal LM or None)``."""
    name, role, kind, path, artifact, run_ = student
    task, items, price_h, references = inp.task, inp.items, inp.price_h, primary.references

    def report(done, n, _b=base_progress, _name=name):
        reporter.report(_b + 0.7 / total * done / n, f"{_name}: {done}/{n} queries")

    t0 = time.perf_counter()
    lm = None
    if kind == "classifier":
        preds = P.predict_classifier(path, items, labels=inp.labels, report=report, check_cancel=reporter.check_cancel)
        size = P.folder_size(path)
    else:
        lm = LocalCausalLM.load(path, kind=kind, policy=policy, cache_dir=_cache_dir())
        preds = P.predict_causal(lm, task, items, report=report, check_cancel=reporter.check_cancel)
        if kind == "base":
            from workers.pipeline.registry import resolve_model

            size = P.folder_size(resolve_model(path, _cache_dir(), policy=policy))
        else:
            size = P.folder_size(path)
    wall = time.perf_counter() - t0
    outs = [p.output for p in preds]
    labs = [p.label for p in preds]
    m = _score(task.task_type, inp.labels, outs, labs, references)
    quality = m.get(M.headline_metric(task.task_type))
    lats = [p.latency_ms for p in preds]
    sp = M.speed_figures(lats)
    if task.task_type == "classification":
        m["agreement"] = M.agreement(labs, primary.labs)
        m["fidelity"] = m["agreement"]
        m["mean_kl_teacher_student"] = M.mean_kl(primary.probs, [p.probs for p in preds])
    elif task.task_type == "extraction":
        m["exact_match_teacher"] = M.extraction_metrics(outs, primary.outs)["exact_match"]
    else:
        m["rouge_l_vs_teacher"] = M.rouge_l(outs, primary.outs)
        if judge is not None:
            reporter.report(None, f"{name}: LLM judge vs the teacher", force=True)
            pairs = [(it.text, o, t) for it, o, t in zip(items, outs, primary.outs) if t is not None]
            m["judge_win_rate"] = M.pairwise_win_rate([p[0] for p in pairs], [p[1] for p in pairs],
                                                      [p[2] for p in pairs], judge)
    m["cost_basis"] = f"compute time x ${price_h:.2f}/h"
    m["wall_s"] = wall
    m["kind"] = kind
    m["layers"] = _layers(kind, path, run_, policy)
    if run_ is not None:
        m["training_run"] = run_.pk
        if run_.student_size:
            m["student_size"] = run_.student_size
            m["teacher_layers"] = (run_.preflight or {}).get("teacher_layers")
    res = EvalResult.objects.create(
        evaluation=inp.ev, model_name=name, role=role, artifact=artifact, metrics=m, quality=quality,
        quality_retention=M.retention(quality, primary.quality), latency_ms_p50=sp["latency_ms_p50"],
        latency_ms_p95=sp["latency_ms_p95"], throughput_qps=sp["throughput_qps"], size_bytes=size,
        cost_per_1k_usd=M.compute_cost_per_1k(lats, price_per_hour_usd=price_h))
    EvalPrediction.objects.bulk_create([
        EvalPrediction(result=res, query_id=p.query_id, output=p.output, label=p.label, probs=p.probs,
                       latency_ms=p.latency_ms, correct=_correct(task.task_type, p.output, p.label, references[i]))
        for i, p in enumerate(preds)])
    return res, lm


def _speedups(teacher_results: list[EvalResult], student_results: list[EvalResult], primary: _Primary) -> None:
    """Each student's ``metrics["speedup_vs_teacher"]``: the primary teacher's p50 latency over
    the student's (``workers.pipeline.evaluation.speedup``), as the seed's size table shows it."""
    teacher = next((r for r in teacher_results if r.teacher_id == primary.teacher.pk), None)
    for r in student_results:
        r.metrics["speedup_vs_teacher"] = P.speedup(teacher.latency_ms_p50 if teacher else None, r.latency_ms_p50)
        EvalResult.objects.filter(pk=r.pk).update(metrics=r.metrics)


def _speculative(inp: _Inputs, reporter, primary_teacher: Teacher, causal_loaded: list) -> dict | None:
    """Speculative decoding with the best causal student as draft, when the primary teacher is
    local; None otherwise. A failed measurement is recorded as ``{"error": ...}``."""
    spec = None
    ev = inp.ev
    if primary_teacher.provider == Teacher.Provider.TRANSFORMERS and primary_teacher.model and causal_loaded:
        reporter.report(0.92, "Measuring speculative decoding", force=True)
        res, student_lm = causal_loaded[0]
        try:
            tname, tpolicy = model_ref_resolve(project=inp.project, ref=primary_teacher.model, field="model",
                                               kinds=("merged",))
            teacher_lm = LocalCausalLM.load(tname, kind="base", policy=tpolicy, cache_dir=_cache_dir(),
                                            device="cpu" if student_lm.device == "cpu" else None)
            n_prompts = int(ev.options.get("speculative_prompts", 3))
            msgs = [P.prompts.teacher_messages(inp.task, it.text) for it in inp.items[:n_prompts]]
            spec = P.speculative_decoding(teacher_lm, student_lm, msgs,
                                          max_new_tokens=int(ev.options.get("speculative_max_new_tokens", 24)))
            spec.update({"teacher": primary_teacher.name, "draft": res.model_name})
        except ValueError as exc:
            spec = {"teacher": primary_teacher.name, "draft": res.model_name, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failed measurement must not lose the evaluation
            spec = {"teacher": primary_teacher.name, "draft": res.model_name, "error": f"{type(exc).__name__}: {exc}"}
    return spec


def _finish(inp: _Inputs, results: list[EvalResult], primary: _Primary, spec: dict | None) -> str:
    """Store the verdict, the summary and the charts; the evaluation ends succeeded. Returns the verdict."""
    ev, excluded, missing, teachers = inp.ev, inp.excluded, inp.missing, inp.teachers
    summary, verdict, ready = _summary(inp.task.task_type, results, primary.teacher.name, primary.quality, spec)
    summary.update({"n_queries": len(inp.items), "split": ev.split, "reference": ev.options["reference"],
                    "price_per_hour_usd": inp.price_h, "teacher_run": inp.run.pk,
                    # Queries left out for every model because a teacher has no answer (API error).
                    "teacher_missing": len(excluded), "teacher_missing_query_ids": excluded[:100],
                    "teacher_missing_by_teacher": {teachers[tid].name: len(q) for tid, q in missing.items() if q}})
    ev.summary = summary
    ev.verdict = verdict
    ev.ready_to_ship = ready
    ev.charts = evaluation_charts(evaluation=ev)
    ev.status = JobStatus.SUCCEEDED
    ev.finished_at = timezone.now()
    ev.save(update_fields=["summary", "verdict", "ready_to_ship", "charts", "status", "finished_at"])
    return verdict


def _judge(ev: Evaluation, task):
    """The optional LLM judge: the teacher named by ``Evaluation.options["judge_teacher"]`` or
    ``project.checks["judge_teacher"]``, as ``judge(query, a, b) -> "A"|"B"|"tie"``; None when
    none is set. Raises InvalidInput when the named teacher does not exist, lacks its key, or
    names a key variable, URL or model the operator's policy refuses now."""
    import os

    name = ev.options.get("judge_teacher") or (ev.project.checks or {}).get("judge_teacher")
    if not name:
        return None
    t = Teacher.objects.filter(project=ev.project, name=name).first()
    if t is None:
        raise InvalidInput(f"judge_teacher: no teacher named {name!r} in this project")
    if t.provider == Teacher.Provider.OPENAI:
        import openai

        try:
            teacher_endpoint_check(base_url=t.base_url, api_key_env=t.api_key_env, on_worker=True)
        except InvalidInput as exc:
            raise InvalidInput(f"judge_teacher {name!r}: {exc}") from None
        key = os.environ.get(t.api_key_env, "") if t.api_key_env else "none"
        if t.api_key_env and not key:
            raise InvalidInput(f"judge_teacher {name!r}: environment variable {t.api_key_env} is not set")
        client = openai.OpenAI(base_url=t.base_url or None, api_key=key or "none", timeout=t.timeout_s)

        def chat(msgs):
            r = client.chat.completions.create(model=t.model, messages=msgs, temperature=0, max_tokens=4)
            return r.choices[0].message.content or ""
    elif t.provider == Teacher.Provider.TRANSFORMERS:
        from workers.pipeline.local_lm import load_cached

        try:
            model, policy = model_ref_resolve(project=ev.project, ref=t.model, field="model", kinds=("merged",))
        except InvalidInput as exc:
            raise InvalidInput(f"judge_teacher {name!r}: {exc}") from None
        lm = load_cached(model, kind="base", policy=policy, cache_dir=_cache_dir())

        def chat(msgs):
            return lm.generate(msgs, max_new_tokens=4).text
    else:
        raise InvalidInput(f"judge_teacher {name!r}: an ensemble cannot judge; name one model")
    return P.make_judge(chat, ev.project.instructions)


def _correct(task_type: str, output, label, reference) -> bool | None:
    if reference is None:
        return None
    if task_type == "classification":
        return label == reference
    if task_type == "extraction":
        return bool(M.extraction_metrics([output], [reference])["exact_match"])
    return (output or "").strip() == str(reference).strip()


def _layers(kind: str, path: str, run_: TrainingRun | None, policy) -> int | None:
    """The student's transformer layers: from its folder's config.json, else (int8, adapter) the
    run's student-size preflight or its merged artifact's config, else (base) the resolved model."""
    layers = P.model_layers(path)
    if layers is None and kind == "base":
        try:
            from workers.pipeline.registry import resolve_model

            layers = P.model_layers(resolve_model(path, _cache_dir(), policy=policy))
        except Exception:  # noqa: BLE001 - informative only
            layers = None
    if layers is None and run_ is not None:
        layers = (run_.preflight or {}).get("student_layers")
        merged = ModelArtifact.objects.filter(training_run=run_, kind="merged").first()
        if layers is None and merged is not None:
            layers = P.model_layers(artifact_folder(artifact=merged))
    return layers


def _students(project: Project) -> list[tuple]:
    """Every model to evaluate as a student: ``(name, role, kind, path, artifact, training_run)``.
    Artifacts of kinds adapter/merged/int8/classifier (path under MEDIA_ROOT), then each distinct
    base student model of the runs that produced a causal artifact (role ``base``)."""
    out = []
    bases: dict[str, TrainingRun] = {}
    arts = (ModelArtifact.objects.filter(project=project, kind__in=STUDENT_KINDS)
            .select_related("training_run").order_by("training_run_id", "id"))
    for a in arts:
        path = Path(artifact_folder(artifact=a))
        if not path.exists():
            raise InvalidState(f"artifact {a.pk} ({a.kind}): {a.path} is missing under the media folder")
        run = a.training_run
        label = f"{a.kind} (run {run.pk})" if run else f"{a.kind} #{a.pk}"
        if run and run.student_size:
            label = f"{a.kind} (run {run.pk}, {run.student_name})"
        out.append((label, "student", a.kind, str(path), a, run))
        # A student-size run's base model is the teacher itself: not a student to compare.
        if run and a.kind in CAUSAL_KINDS and run.student_model and not run.student_size:
            bases.setdefault(run.student_model, run)
    for name, run in bases.items():
        # A base student is loaded from what its reference resolves to now (an artifact of this
        # project, a bundled name, a hub id); a refused one fails the evaluation with the reason.
        path, _ = model_ref_resolve(project=project, ref=name, field="student_model", kinds=("merged",))
        out.append((f"{name} (base)", "base", "base", path, None, None))
    return out


def _summary(task_type: str, results: list[EvalResult], teacher_name: str, teacher_quality: float | None,
             spec: dict | None) -> tuple[dict, str, bool | None]:
    """Headline figures and the verdict: ready to ship when the best student keeps at least 95 %
    of the teacher's quality (retention >= 0.95, ``workers.pipeline.evaluation.verdict``)."""
    metric = M.headline_metric(task_type)
    teacher = next(r for r in results if r.role == "teacher" and r.model_name == teacher_name)
    studs = [r for r in results if r.role in ("student", "base") and r.quality is not None]
    summary = {"metric": metric, "teacher": teacher_name, "teacher_quality": teacher_quality,
               "teacher_latency_ms_p50": teacher.latency_ms_p50, "teacher_cost_per_1k_usd": teacher.cost_per_1k_usd,
               "speculative_decoding": spec}
    if not studs:
        return summary, "no student to evaluate yet: train one on the Students page", None
    best = max(studs, key=lambda r: (r.quality, -(r.latency_ms_p50 or 0)))
    speedup = (teacher.latency_ms_p50 / best.latency_ms_p50
               if teacher.latency_ms_p50 and best.latency_ms_p50 else None)
    summary.update({"best_student": best.model_name, "best_quality": best.quality,
                    "retention": best.quality_retention, "speedup": speedup,
                    "cost_per_1k_usd": best.cost_per_1k_usd,
                    "size_bytes": best.size_bytes, "latency_ms_p50": best.latency_ms_p50})
    text, ready = P.verdict(metric=metric, best_model=best.model_name, retention=best.quality_retention,
                            teacher_quality=teacher_quality, best_quality=best.quality)
    return summary, text, ready


def evaluation_charts(*, evaluation) -> dict:
    """Every chart of an evaluation, by name, built from its EvalResult / EvalPrediction rows and
    the project's TrainingMetric rows; stored in ``Evaluation.charts``."""
    from workers.pipeline.metrics import headline_metric

    results = list(evaluation.results.order_by("id"))
    metric = headline_metric(evaluation.project.task_type)
    latencies: dict[str, list[float]] = {}
    for r in results:
        latencies[r.model_name] = [x for x in EvalPrediction.objects.filter(result=r, latency_ms__isnull=False)
                                   .order_by("query_id").values_list("latency_ms", flat=True)]
    charts = {
        "quality_by_model": eval_quality_by_model(results=results, metric=metric),
        "quality_vs_cost": eval_quality_vs_cost(results=results, metric=metric),
        "latency": eval_latency_distributions(latencies=latencies),
    }
    studs = [r for r in results if r.role in ("student", "base") and r.quality is not None]
    if evaluation.project.task_type == "classification" and studs:
        best = max(studs, key=lambda r: r.quality)
        charts["confusion"] = eval_confusion_matrix(confusion=best.metrics.get("confusion"), model=best.model_name)
    run_ids = {r.metrics.get("training_run") for r in results if r.metrics.get("training_run")}
    charts["training_loss"] = eval_training_loss(runs=TrainingRun.objects.filter(pk__in=run_ids).order_by("pk"))
    charts["history"] = eval_history(project=evaluation.project, split=evaluation.split, current=evaluation)
    return {k: v for k, v in charts.items() if v}
