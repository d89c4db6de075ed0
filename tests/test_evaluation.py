"""Evaluation end to end: a real Celery worker evaluates a real SmolLM2 student (merged and
INT8 copies plus the untouched base model) and a MiniLM classifier against a local teacher and
an API teacher, on real BANKING77 test queries; the numbers appear on the pages and the CLI."""
from __future__ import annotations

import csv
import contextlib
import io
import json
import os
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from tests.conftest import wait_job

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
N_TEST = 6


def _link_or_copy(src: Path, dst: Path) -> None:
    """A real artifact folder without copying half a gigabyte: hard links when possible."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


@pytest.fixture(scope="session")
def student_folders():
    """Artifact folders under MEDIA_ROOT: ``merged`` (the base SmolLM2 saved as a folder), ``int8``
    (quantized with torch dynamic INT8 as local_lm describes) and ``classifier`` (MiniLM with a
    random 3-label head). Built once and kept for later runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.pipeline.local_lm import INT8_FILE
    from workers.pipeline.registry import SMOLLM2, resolve_model

    root = Path(settings.MEDIA_ROOT) / "test-eval-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    base = Path(resolve_model(SMOLLM2))
    merged = root / "merged"
    if not (merged / "model.safetensors").exists():
        shutil.rmtree(merged, ignore_errors=True)
        _link_or_copy(base, merged)
    int8 = root / "int8"
    if not (int8 / INT8_FILE).exists():
        int8.mkdir(exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(int8)
        torch.save(q, int8 / (INT8_FILE + ".tmp"))
        os.replace(int8 / (INT8_FILE + ".tmp"), int8 / INT8_FILE)
    return {"merged": merged, "int8": int8, "classifier": _classifier_folder()}


def _classifier_folder() -> Path:
    """A MiniLM classifier artifact folder with a random 3-label head (seeded) under MEDIA_ROOT,
    built once and kept for later runs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.pipeline.registry import MINILM, resolve_model

    root = Path(settings.MEDIA_ROOT) / "test-eval-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    clf = root / "classifier"
    if not (clf / "config.json").exists():
        torch.manual_seed(0)
        src = resolve_model(MINILM)
        m = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
        tmp = root / "classifier.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        os.replace(tmp, clf)
    return clf


def _banking_rows(shared_data, n):
    rows = []
    with open(shared_data / "banking77" / "test.csv", newline="", encoding="utf-8") as f:
        per_label = {l: 0 for l in LABELS}
        for r in csv.DictReader(f):
            cat = r["category"].lower()  # BANKING77 spells one intent "Refund_not_showing_up"
            if cat in per_label and per_label[cat] < (n + 2) // 3:
                per_label[cat] += 1
                rows.append((r["text"], cat))
    assert len(rows) >= n, per_label
    return rows[:n]


def _setup_project(project, shared_data, student_folders):
    """Test queries with gold labels, a local and an API teacher with their answers (a finished
    GenerationRun on the test split), two training runs with their artifacts and loss curves."""
    import hashlib

    from projects.models import (
        GenerationRun, ModelArtifact, Query, Sample, Teacher, TrainingMetric, TrainingRun,
    )
    from workers.pipeline.evaluation import folder_size

    queries = []
    for i, (text, label) in enumerate(_banking_rows(shared_data, N_TEST)):
        queries.append(Query.objects.create(project=project, text=text, text_hash=hashlib.sha256(text.encode()).hexdigest(),
                                            split="test", reference=label))
    local = Teacher.objects.create(project=project, name="smollm2-teacher", provider="transformers",
                                   model="smollm2-135m-instruct")
    api = Teacher.objects.create(project=project, name="gpt-api", provider="openai", model="gpt-x",
                                 price_in_per_1m=Decimal("1.0"), price_out_per_1m=Decimal("2.0"))
    run = GenerationRun.objects.create(project=project, status="succeeded", options={"split": "test"})
    run.teachers.set([local, api])
    wrong = {"card_arrival": "lost_or_stolen_card", "lost_or_stolen_card": "refund_not_showing_up",
             "refund_not_showing_up": "card_arrival"}
    for i, q in enumerate(queries):
        # The local teacher is right on 5 of 6, the API teacher on 4 of 6.
        for t, bad in ((local, {0}), (api, {0, 1})):
            label = wrong[q.reference] if i in bad else q.reference
            probs = {l: (0.8 if l == label else 0.1) for l in LABELS}
            Sample.objects.create(run=run, query=q, teacher=t, response=label, parsed=label, status="accepted",
                                  input_tokens=100, output_tokens=10, latency_ms=400.0 + 10 * i,
                                  label_probs=probs if t is local else None)
    sft = TrainingRun.objects.create(project=project, method="sft-lora", student_model="smollm2-135m-instruct",
                                     status="succeeded")
    clf = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6",
                                     status="succeeded")
    for step, loss in ((1, 2.5), (2, 1.9), (3, 1.4)):
        TrainingMetric.objects.create(run=sft, step=step, split="train", loss=loss)
    media = Path(settings.MEDIA_ROOT)
    for run_, kind in ((sft, "merged"), (sft, "int8"), (clf, "classifier")):
        path = student_folders[kind]
        ModelArtifact.objects.create(project=project, training_run=run_, kind=kind, path=str(path.relative_to(media)),
                                     size_bytes=folder_size(path))
    return queries, local, api, sft, clf


@pytest.mark.slow
def test_full_evaluation_through_the_worker(celery_worker, project, owner, owner_client, shared_data, student_folders):
    from projects.models import EvalPrediction, EvalResult, Evaluation
    from projects.services.evaluation import evaluation_start

    queries, local, api, sft, clf = _setup_project(project, shared_data, student_folders)
    # Short speculative-decoding and generation budgets keep this test to minutes on 2 shared cores.
    ev = evaluation_start(project=project, user=owner, split="test",
                          options={"speculative_prompts": 1, "speculative_max_new_tokens": 8})
    job = wait_job(ev.job_id, timeout=600)
    assert job.status == "succeeded", (job.message, job.error)
    ev.refresh_from_db()
    assert ev.status == "succeeded"

    results = {r.model_name: r for r in EvalResult.objects.filter(evaluation=ev)}
    assert set(results) == {"smollm2-teacher", "gpt-api", f"merged (run {sft.pk})", f"int8 (run {sft.pk})",
                            f"classifier (run {clf.pk})", "smollm2-135m-instruct (base)"}
    teacher = results["smollm2-teacher"]
    assert teacher.quality == pytest.approx(5 / 6) and teacher.quality_retention == pytest.approx(1.0)
    assert results["gpt-api"].quality == pytest.approx(4 / 6)
    # API teacher: (100 x $1 + 10 x $2) / 1M per query -> $0.12 per 1K queries.
    assert results["gpt-api"].cost_per_1k_usd == pytest.approx(0.12)
    assert results["gpt-api"].metrics["agreement"] == pytest.approx(5 / 6)
    # Local teacher: mean 425 ms at the default $0.10/h.
    assert teacher.cost_per_1k_usd == pytest.approx(425 / 3_600_000 * 0.10 * 1000)
    assert teacher.latency_ms_p50 == pytest.approx(425.0)

    for name, r in results.items():
        preds = list(EvalPrediction.objects.filter(result=r))
        assert len(preds) == N_TEST, name
        if r.role == "teacher":
            continue
        assert r.quality == pytest.approx(sum(p.correct for p in preds) / N_TEST)
        assert r.quality_retention == pytest.approx(r.quality / (5 / 6))
        assert r.latency_ms_p50 > 0 and r.latency_ms_p95 >= r.latency_ms_p50 and r.throughput_qps > 0
        assert r.size_bytes > 1_000_000 and r.cost_per_1k_usd > 0
        assert r.metrics["mean_kl_teacher_student"] >= 0
        assert 0 <= r.metrics["agreement"] <= 1
        assert sum(map(sum, r.metrics["confusion"]["matrix"])) == N_TEST
        assert all(abs(sum(p.probs.values()) - 1) < 1e-4 for p in preds)
    # The merged copy is the base model's weights: same answers; INT8 is smaller on disk.
    merged, base = results[f"merged (run {sft.pk})"], results["smollm2-135m-instruct (base)"]
    assert merged.quality == base.quality
    assert results[f"int8 (run {sft.pk})"].size_bytes < merged.size_bytes

    s = ev.summary
    best = max((r for r in results.values() if r.role != "teacher"), key=lambda r: r.quality)
    assert s["best_quality"] == best.quality and s["retention"] == pytest.approx(best.quality / (5 / 6))
    assert ev.ready_to_ship == (s["retention"] >= 0.95)
    assert ("ready to ship" in ev.verdict) == ev.ready_to_ship
    # Speculative decoding: the teacher is SmolLM2 and the draft shares its tokenizer.
    spec = s["speculative_decoding"]
    assert "error" not in spec, spec
    assert spec["tokens"] > 0 and spec["speedup"] > 0
    if spec["draft"] in (merged.model_name, base.model_name):  # identical weights: every draft token accepted
        assert spec["acceptance_rate"] == pytest.approx(1.0)
    assert {"quality_by_model", "quality_vs_cost", "latency", "confusion", "training_loss", "history"} <= set(ev.charts)
    assert ev.charts["training_loss"]["data"][0]["y"] == [2.5, 1.9, 1.4]

    page = owner_client.get(reverse("evaluation_detail", args=[project.slug, ev.pk])).content.decode()
    assert "plotly/plotly.min.js" in page and 'id="eval-charts"' in page
    assert ev.verdict.split(":")[0] in page
    for r in results.values():
        assert f"{r.quality:.3f}" in page
    assert f"{spec['speedup']:.2f}×" in page
    compare = owner_client.get(reverse("evaluation_compare", args=[project.slug, ev.pk]) + f"?student={best.pk}")
    assert compare.status_code == 200
    n_disagree = sum(1 for p in EvalPrediction.objects.filter(result=best)
                     if p.label != EvalPrediction.objects.get(result=teacher, query=p.query).label)
    assert f"{n_disagree} disagreement" in compare.content.decode()
    overview = owner_client.get(reverse("project_overview", args=[project.slug])).content.decode()
    assert f"{s['retention'] * 100:.1f} %" in overview and "cost per 1K" in overview

    # A second evaluation from the page's button, cancelled while it runs: the row follows its job.
    r = owner_client.post(reverse("evaluation_start", kwargs={"slug": project.slug}), {"split": "test", "limit": "2"})
    ev2 = Evaluation.objects.exclude(pk=ev.pk).get(project=project)
    assert r.status_code == 302 and r["Location"] == reverse("evaluation_detail", args=[project.slug, ev2.pk])
    from projects.services.jobs import job_cancel

    job_cancel(job=ev2.job, user=owner)
    assert wait_job(ev2.job_id, timeout=120).status == "cancelled"
    ev2.refresh_from_db()
    assert ev2.status == "cancelled"


def _distill_json(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call_command("distill", *args)
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_evaluates_the_golden_set(celery_worker, team, owner):
    """`distill evaluate --split golden --wait --json` prints the contract's keys; with no student
    trained yet the teachers are still compared and the verdict says what is missing."""
    import hashlib

    from projects.models import GenerationRun, Query, Sample, Teacher
    from projects.services.projects import project_create

    p = project_create(team=team, user=owner, name="Spam filter", task_type="classification", labels=["ham", "spam"])
    t = Teacher.objects.create(project=p, name="api", provider="openai", model="m",
                               price_in_per_1m=Decimal("0.5"), price_out_per_1m=Decimal("1.5"))
    run = GenerationRun.objects.create(project=p, status="succeeded", options={"split": "golden"})
    for i, (text, ref, answer) in enumerate([("Win a prize now", "spam", "spam"), ("See you at 6", "ham", "ham"),
                                             ("Free entry!!", "spam", "ham")]):
        q = Query.objects.create(project=p, text=text, text_hash=hashlib.sha256(text.encode()).hexdigest(),
                                 split="test", golden=True, reference=ref)
        Sample.objects.create(run=run, query=q, teacher=t, response=answer, parsed=answer, status="accepted",
                              input_tokens=200, output_tokens=2, latency_ms=300.0)
    data = _distill_json("evaluate", "--project", p.slug, "--split", "golden", "--wait", "--json")
    assert set(data) >= {"evaluation", "results", "verdict"}
    assert data["split"] == "golden" and data["status"] == "succeeded"
    assert "no student" in data["verdict"]
    [row] = data["results"]
    assert set(row) >= {"model", "role", "metrics", "quality_retention", "latency_ms_p50", "latency_ms_p95", "cost_per_1k_usd"}
    assert row["model"] == "api" and row["role"] == "teacher"
    assert row["metrics"]["n"] == 3 and row["metrics"]["accuracy"] == pytest.approx(2 / 3)
    # (200 x $0.5 + 2 x $1.5) / 1M per query = $0.000103 -> $0.103 per 1K
    assert row["cost_per_1k_usd"] == pytest.approx(0.103)
    assert row["latency_ms_p50"] == 300.0


@pytest.mark.django_db
def test_evaluation_start_refuses_bad_input(project, viewer, owner):
    from projects.models import Query, Teacher
    from projects.services import InvalidInput, InvalidState, NotAllowed
    from projects.services.evaluation import evaluation_start

    with pytest.raises(InvalidInput, match="split"):
        evaluation_start(project=project, user=owner, split="train")
    with pytest.raises(InvalidState, match="test split .* has no queries"):
        evaluation_start(project=project, user=owner)
    Query.objects.create(project=project, text="where is my card", text_hash="h1", split="test")
    with pytest.raises(InvalidState, match="no teacher"):
        evaluation_start(project=project, user=owner)
    Teacher.objects.create(project=project, name="t", provider="openai", model="m")
    with pytest.raises(InvalidInput, match="limit"):
        evaluation_start(project=project, user=owner, options={"limit": 0})
    with pytest.raises(NotAllowed):
        evaluation_start(project=project, user=viewer)
    ev = evaluation_start(project=project, user=owner, options={"limit": 5, "price_per_hour_usd": "0.5"})
    assert ev.job.kind == "evaluation" and ev.job.payload["evaluation_id"] == ev.pk
    assert ev.options == {"limit": 5, "price_per_hour_usd": 0.5}


@pytest.mark.django_db
def test_viewer_sees_no_evaluate_button(client, viewer, project):
    client.force_login(viewer)
    body = client.get(reverse("evaluation_page", args=[project.slug])).content.decode()
    assert "Evaluations" in body and ">Evaluate</button>" not in body
    r = client.post(reverse("evaluation_start", args=[project.slug]), {"split": "test"})
    assert r.status_code == 302
    from projects.models import Evaluation

    assert not Evaluation.objects.exists()


# --- which teacher answers an evaluation scores -----------------------------------------------


def _test_queries(project, shared_data, n):
    import hashlib

    from projects.models import Query

    return [Query.objects.create(project=project, text=text, text_hash=hashlib.sha256(text.encode()).hexdigest(),
                                 split="test", reference=label)
            for text, label in _banking_rows(shared_data, n)]


def _classifier_student(project):
    """A finished classifier-kd training run with its MiniLM artifact: the student evaluated."""
    from projects.models import ModelArtifact, TrainingRun
    from workers.pipeline.evaluation import folder_size

    path = _classifier_folder()
    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6",
                                     status="succeeded")
    ModelArtifact.objects.create(project=project, training_run=run, kind="classifier", size_bytes=folder_size(path),
                                 path=str(path.relative_to(Path(settings.MEDIA_ROOT))))
    return run


def _finished(ev):
    job = wait_job(ev.job_id, timeout=300)
    assert job.status == "succeeded", (job.message, job.error)
    ev.refresh_from_db()
    return ev, {r.role: r for r in ev.results.all()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_teacher_run_made_with_limit_is_not_reused_for_queries_it_never_answered(celery_worker, project, owner,
                                                                                 shared_data):
    """A teacher run over the first 2 test queries (``--limit 2``) serves an evaluation of those 2
    queries, but not one of all 4: that one starts a teacher run over the whole split instead of
    counting the 2 unanswered queries as the teacher's mistakes (which halved its accuracy and
    doubled every student's retention)."""
    from projects.models import EvalPrediction, GenerationRun, Sample
    from projects.services.evaluation import evaluation_start
    from projects.services.generation import teacher_create
    from tests.openai_stub import StubServer

    queries = _test_queries(project, shared_data, 4)
    refs = {q.text: q.reference for q in queries}
    stub = StubServer(answer=lambda msg: next((l for t, l in refs.items() if t in msg), "card_arrival")).start()
    try:
        t = teacher_create(project=project, name="api", provider="openai", model="gpt-stub", base_url=stub.base_url)
        old = GenerationRun.objects.create(project=project, status="succeeded", limit=2,
                                           options={"split": "test", "queries": 2})
        old.teachers.set([t])
        for q in queries[:2]:
            Sample.objects.create(run=old, query=q, teacher=t, response=q.reference, parsed=q.reference,
                                  status="accepted", input_tokens=20, output_tokens=5, latency_ms=100.0)
        _classifier_student(project)

        ev, res = _finished(evaluation_start(project=project, user=owner, split="test", options={"limit": 2}))
        assert (ev.summary["teacher_run"], ev.summary["n_queries"], stub.total_completed) == (old.pk, 2, 0)
        assert res["teacher"].quality == 1.0

        ev, res = _finished(evaluation_start(project=project, user=owner, split="test"))
        assert (res["teacher"].quality, res["teacher"].metrics["n"]) == (1.0, 4)  # was 0.5: 2 of 4 "wrong"
        assert GenerationRun.objects.filter(project=project).count() == 2
        new = GenerationRun.objects.exclude(pk=old.pk).get(project=project)
        assert new.options["split"] == "test" and new.limit is None
        assert ev.summary["teacher_run"] == new.pk and ev.options["teacher_run"] == new.pk
        assert stub.total_completed == 4 and set(stub.completed.values()) == {1}
        teacher, student = res["teacher"], res["student"]
        assert (teacher.quality, teacher.metrics["n"], teacher.metrics["teacher_missing"]) == (1.0, 4, 0)
        assert (ev.summary["n_queries"], ev.summary["teacher_missing"]) == (4, 0)
        qids = sorted(q.pk for q in queries)
        for r in (teacher, student):
            assert sorted(EvalPrediction.objects.filter(result=r).values_list("query_id", flat=True)) == qids
        assert student.metrics["n"] == 4
        assert student.quality_retention == pytest.approx(student.quality / 1.0)
    finally:
        stub.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_teacher_answers_are_left_out_for_every_model_and_edits_never_count(celery_worker, project, owner,
                                                                                  shared_data):
    """Query 2's request failed (an API error): it is not a wrong answer but a missing one, left
    out for the teacher AND the students and reported as ``teacher_missing``. Query 1's first
    request failed and its retry answered: that answer counts. Query 3's wrong answer was edited
    by a reviewer (before review excluded evaluation runs): the teacher keeps its own answer."""
    from projects.models import EvalPrediction, GenerationRun, ReviewDecision, Sample, Teacher
    from projects.services.evaluation import evaluation_start

    q0, q1, q2, q3 = _test_queries(project, shared_data, 4)
    t = Teacher.objects.create(project=project, name="api", provider="openai", model="m")
    run = GenerationRun.objects.create(project=project, status="succeeded", options={"split": "test"})
    run.teachers.set([t])
    wrong = next(l for l in LABELS if l != q3.reference)

    def sample(q, response, status="accepted", index=0, **kw):
        return Sample.objects.create(run=run, query=q, teacher=t, sample_index=index, response=response,
                                     parsed=response if status != "failed" else None, status=status,
                                     input_tokens=20, output_tokens=5, latency_ms=100.0, **kw)

    sample(q0, q0.reference)
    sample(q1, None, status="failed", error="APIError: 500 upstream hiccup")
    sample(q1, q1.reference, index=1)
    sample(q2, None, status="failed", error="APIError: 500 upstream hiccup")
    s3 = sample(q3, wrong, review_status="accepted", edited_response=q3.reference, version=1)
    Sample.objects.filter(pk=s3.pk).update(parsed=q3.reference)  # what an edit-and-accept wrote
    ReviewDecision.objects.create(sample=s3, user=owner, decision="edit", previous_parsed=wrong,
                                  original_response=wrong, edited_response=q3.reference, version_after=1)
    _classifier_student(project)

    ev, res = _finished(evaluation_start(project=project, user=owner, split="test"))
    teacher, student = res["teacher"], res["student"]
    # q0 and q1 right, q3 wrong (its own answer); q2 left out. Before: 2/4 (q1, q2 "wrong", q3's edit right).
    assert (teacher.metrics["n"], teacher.quality) == (3, pytest.approx(2 / 3))
    assert ev.summary["teacher_run"] == run.pk and GenerationRun.objects.filter(project=project).count() == 1
    assert (ev.summary["n_queries"], ev.summary.get("teacher_missing"), ev.summary.get("teacher_missing_query_ids"),
            ev.summary.get("teacher_missing_by_teacher")) == (3, 1, [q2.pk], {"api": 1})
    assert teacher.metrics.get("teacher_missing") == 1
    assert EvalPrediction.objects.get(result=teacher, query=q3).label == wrong
    scored = sorted([q0.pk, q1.pk, q3.pk])
    for r in (teacher, student):
        assert sorted(EvalPrediction.objects.filter(result=r).values_list("query_id", flat=True)) == scored
    assert student.metrics["n"] == 3
    assert student.quality == pytest.approx(
        sum(p.correct for p in EvalPrediction.objects.filter(result=student)) / 3)
    assert student.quality_retention == pytest.approx(student.quality / (2 / 3))
    assert ev.summary["teacher_quality"] == pytest.approx(2 / 3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_student_size_result_shows_preset_layers_size_and_speedup(celery_worker, project, owner, owner_client,
                                                                  shared_data):
    """A light student (SmolLM2 cut to 3 of 30 layers, as a student-size run saves it) is
    evaluated against the local teacher: its row names the preset, its layers (3/30), its size
    and its speed-up over the teacher, on the page and in the CLI's JSON."""
    import hashlib

    from projects.models import EvalResult, GenerationRun, ModelArtifact, Query, Sample, Teacher, TrainingRun
    from projects.services.evaluation import evaluation_api_summary, evaluation_start
    from workers.pipeline.evaluation import folder_size
    from workers.pipeline.registry import SMOLLM2, resolve_model
    from workers.pipeline.student_init import build_student

    folder = Path(settings.MEDIA_ROOT) / "test-eval-artifacts" / "light-merged"
    init = build_student(resolve_model(SMOLLM2), "light", folder)
    local = Teacher.objects.create(project=project, name="smollm2-teacher", provider="transformers", model=SMOLLM2)
    gen = GenerationRun.objects.create(project=project, status="succeeded", options={"split": "test"})
    gen.teachers.set([local])
    for i, (text, label) in enumerate(_banking_rows(shared_data, 3)):
        q = Query.objects.create(project=project, text=text, text_hash=hashlib.sha256(text.encode()).hexdigest(),
                                 split="test", reference=label)
        Sample.objects.create(run=gen, query=q, teacher=local, response=label, parsed=label, status="accepted",
                              latency_ms=2000.0)
    run = TrainingRun.objects.create(project=project, method="logit-kd", student_model=SMOLLM2, status="succeeded",
                                     hyperparams={"student_size": "light", "teacher": local.name},
                                     preflight={"student_layers": init.student_layers,
                                                "teacher_layers": init.teacher_layers})
    ModelArtifact.objects.create(project=project, training_run=run, kind="merged",
                                 path=str(folder.relative_to(Path(settings.MEDIA_ROOT))), size_bytes=folder_size(folder))
    ev = evaluation_start(project=project, user=owner, split="test",
                          options={"speculative_prompts": 1, "speculative_max_new_tokens": 4})
    job = wait_job(ev.job_id, timeout=500)
    assert job.status == "succeeded", (job.message, job.error)
    ev.refresh_from_db()
    name = f"merged (run {run.pk}, smollm2-135m-instruct@light (3/30 layers))"
    # The base of a sized run is the teacher itself: no "(base)" row.
    assert set(EvalResult.objects.filter(evaluation=ev).values_list("model_name", flat=True)) == {
        "smollm2-teacher", name}
    rows = {r["model"]: r for r in evaluation_api_summary(evaluation=ev)["results"]}
    s, t = rows[name], rows["smollm2-teacher"]
    assert (s["student_size"], s["layers"], s["metrics"]["teacher_layers"], t["layers"]) == ("light", 3, 30, 30)
    assert s["size_bytes"] == folder_size(folder) and s["size_bytes"] < t["size_bytes"] / 3
    assert s["speedup"] == pytest.approx(2000.0 / s["latency_ms_p50"])
    page = owner_client.get(reverse("evaluation_detail", args=[project.slug, ev.pk])).content.decode()
    assert "<th>Student size</th>" in page and ">3/30</td>" in page and "<td>light</td>" in page
    assert f"{s['speedup']:.1f}×" in page
