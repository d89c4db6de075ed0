"""The loop back from production: logged teacher answers become samples of a "production
traffic" generation run (through the same checks, so rejected ones land in the review queue);
the promote rule and the divergence alert; continuous distillation (retrain on the latest data
with the teacher fixed and propose the new student as the next A/B candidate). Driven by
``workers.runs.serving.serving_tick`` (Celery beat, ``workers.tasks.serving_tick_task``) and by
the pages and CLI."""
from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from projects.models import Deployment, GenerationRun, JobStatus, Query, RequestLog, Sample, Split, TrainingRun
from projects.selectors import project_task_spec
from projects.services import InvalidInput, InvalidState
from projects.services.permissions import ensure_can_write

HARVEST_BATCH = 5000
SOURCE = "production traffic"


def deployment_harvest(*, deployment: Deployment, user=None, limit: int = HARVEST_BATCH) -> dict:
    """Turn the deployment's logged teacher answers (routes teacher, fallback, shadow) not yet
    harvested into samples of a new GenerationRun with ``options.source = "production
    traffic"``: each query is added to the project (train split, ``metadata.source``) unless it
    exists, and each answer goes through the project's checks, so rejected ones enter the review
    queue. At most ``limit`` log rows per call. Returns ``{run (id or None), requests, accepted,
    rejected}``. Raises NotAllowed for viewers."""
    from workers.pipeline.checks import Answer, run_checks
    from workers.pipeline.ingest import clean_text, text_hash
    from workers.pipeline.prompts import teacher_messages

    dep = deployment
    ensure_can_write(user=user, team=dep.project.team)
    logs = list(RequestLog.objects.filter(deployment=dep, id__gt=dep.harvested_upto, status=200,
                                          teacher_response__isnull=False).exclude(query="")
                .order_by("id").values("id", "query", "teacher_response", "input_tokens", "output_tokens", "cost_usd",
                                       "upstream_ms", "finish_reason", "route")[:limit])
    if not logs:
        return {"run": None, "requests": 0, "accepted": 0, "rejected": 0}
    project, teacher = dep.project, dep.teacher
    task = project_task_spec(project)
    with transaction.atomic():
        d = Deployment.objects.select_for_update().get(pk=dep.pk)
        if d.harvested_upto >= logs[-1]["id"]:
            return {"run": None, "requests": 0, "accepted": 0, "rejected": 0}  # another harvest took them
        logs = [r for r in logs if r["id"] > d.harvested_upto]
        texts = {}
        for r in logs:
            t = clean_text(r["query"])
            if t:
                texts.setdefault(text_hash(t), t)
        existing = dict(Query.objects.filter(project=project, golden=False, text_hash__in=list(texts))
                        .values_list("text_hash", "id"))
        new = [Query(project=project, text=t, text_hash=h, split=Split.TRAIN, golden=False,
                     metadata={"source": SOURCE, "deployment": dep.slug})
               for h, t in texts.items() if h not in existing]
        Query.objects.bulk_create(new, ignore_conflicts=True)
        if new:
            Project = type(project)
            Project.objects.filter(pk=project.pk).update(search_version=F("search_version") + 1)
        qids = dict(Query.objects.filter(project=project, golden=False, text_hash__in=list(texts))
                    .values_list("text_hash", "id"))
        run = GenerationRun.objects.create(project=project, status=JobStatus.SUCCEEDED, samples_per_query=1,
                                           concurrency=1, options={"source": SOURCE, "deployment": dep.slug,
                                                                   "first_request": logs[0]["id"],
                                                                   "last_request": logs[-1]["id"]},
                                           created_by=user if getattr(user, "pk", None) else None,
                                           finished_at=timezone.now())
        run.teachers.add(teacher)
        index: dict[int, int] = {}
        samples = []
        for r in logs:
            t = clean_text(r["query"])
            if not t:
                continue
            qid = qids[text_hash(t)]
            i = index.get(qid, 0)
            index[qid] = i + 1
            verdict = run_checks(Answer(text=r["teacher_response"], finish_reason=r["finish_reason"] or "stop"), task)
            samples.append(Sample(
                run=run, query_id=qid, teacher=teacher, sample_index=i, prompt=teacher_messages(task, t),
                response=r["teacher_response"], parsed=verdict.parsed, finish_reason=(r["finish_reason"] or "")[:40],
                input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                cost_usd=Decimal(str(round(r["cost_usd"] or 0.0, 8))), latency_ms=r["upstream_ms"],
                checks=[c.as_dict() for c in verdict.checks], failed_checks=verdict.failed,
                status="accepted" if verdict.accepted else "rejected"))
        Sample.objects.bulk_create(samples)
        acc = sum(s.status == "accepted" for s in samples)
        GenerationRun.objects.filter(pk=run.pk).update(
            accepted=acc, rejected=len(samples) - acc, input_tokens=sum(s.input_tokens for s in samples),
            output_tokens=sum(s.output_tokens for s in samples), cost_usd=sum((s.cost_usd for s in samples), Decimal(0)))
        Deployment.objects.filter(pk=dep.pk).update(harvested_upto=logs[-1]["id"],
                                                    harvested_since_retrain=F("harvested_since_retrain") + acc)
    dep.refresh_from_db()
    return {"run": run.pk, "requests": len(logs), "accepted": acc, "rejected": len(samples) - acc}


def _student_run(dep: Deployment) -> TrainingRun | None:
    art = dep.student_artifact
    return art.training_run if art is not None and art.training_run_id else None


def deployment_retrain(*, deployment: Deployment, user=None) -> TrainingRun:
    """Continuous distillation, one step: train a new student on the project's curated data
    (which now includes the harvested production samples), with the teacher fixed and the same
    method, student model and preset as the deployed student's run (classifier-kd or sft-lora
    when the student came from elsewhere). Records the run on the deployment; when it succeeds,
    ``serving_tick`` evaluates it and proposes its artifact as the next A/B candidate. Raises
    InvalidState while an earlier retrain still runs; the errors of ``training_start``."""
    from projects.services.training import training_start

    dep = deployment
    if dep.retrain_run_id and dep.retrain_run.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise InvalidState(f"deployment {dep.slug}: retrain run {dep.retrain_run_id} is still {dep.retrain_run.status}")
    base = _student_run(dep)
    if base is not None:
        method, student, preset = base.method, base.student_model, base.preset or "fast"
    else:
        method = "classifier-kd" if dep.project.task_type == "classification" else "sft-lora"
        student, preset = "", "fast"
    run = training_start(project=dep.project, method=method, student_model=student, preset=preset, user=user)
    Deployment.objects.filter(pk=dep.pk).update(retrain_run=run, harvested_since_retrain=0)
    dep.refresh_from_db()
    return run


def deployment_use_candidate(*, deployment: Deployment, user=None) -> Deployment:
    """Make the proposed candidate the deployment's student (a new version, at the current
    share: the A/B test starts again). Raises InvalidState when there is no candidate."""
    from projects.services.deployments import deployment_update

    dep = deployment
    if dep.candidate_artifact_id is None:
        raise InvalidState(f"deployment {dep.slug}: no candidate student proposed yet")
    fields = {"student_artifact": dep.candidate_artifact_id}
    if dep.candidate_artifact.kind != "classifier" and not dep.student_url:
        raise InvalidInput(f"student_url: serve candidate artifact {dep.candidate_artifact_id} with `distill "
                           f"serve-student --artifact {dep.candidate_artifact_id}` and set its URL first")
    dep = deployment_update(deployment=dep, user=user, action="candidate", note=f"student artifact "
                            f"{dep.candidate_artifact_id} from continuous distillation", **fields)
    Deployment.objects.filter(pk=dep.pk).update(candidate_artifact=None)
    dep.refresh_from_db()
    return dep
