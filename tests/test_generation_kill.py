"""A worker SIGKILLed in the middle of a generation run: after a new worker starts and the run is
resumed, every slot has exactly one sample and no completed API call was made twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_job
from tests.generation_fixtures import add_queries, banking_project
from tests.openai_stub import StubServer


def start_worker(queue: str, name: str) -> subprocess.Popen:
    """A Celery worker process group of our own (prefork, 2 children) on ``queue`` only."""
    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DATABASE_URL"] = (f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:"
                           f"{db.get('PORT') or 5432}/{connection.settings_dict['NAME']}")
    env["DISTILLHUB_DATA_DIR"] = str(settings.DATA_DIR)
    log_path = Path(settings.DATA_DIR) / f"test-{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "distillhub", "worker", "-Q", queue, "--concurrency", "2",
                             "--pool", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                             "--hostname", f"{name}-{os.getpid()}@%h"],
                            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240  # a cold start on a loaded machine; ends at "ready."
    while "ready." not in log_path.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"worker {name} did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.3)
    return proc


@pytest.mark.timeout(900)  # an upper bound for a loaded CI machine (two worker starts)
@pytest.mark.django_db(transaction=True)
def test_sigkill_mid_run_then_resume_leaves_one_sample_per_slot(team, owner, settings):
    from django.utils import timezone

    from projects.models import GenerationRun, Job, Sample
    from projects.services.generation import generation_resume, generation_start, teacher_create
    from projects.services.jobs import jobs_mark_stale

    queue = f"gen-kill-{os.getpid()}"
    stub = StubServer(answer=lambda text: "card_arrival", hang_after=7).start()
    w1 = w2 = None
    try:
        project = banking_project(team, owner)
        queries = add_queries(project, [(f"customer message {i}", "card_arrival") for i in range(30)])
        teacher_create(project=project, name="api", provider="openai", model="stub", base_url=stub.base_url, timeout_s=120,
                       price_in_per_1m=1, price_out_per_1m=2)
        w1 = start_worker(queue, "w1")
        run = generation_start(project=project, user=owner, concurrency=4, chunk_size=10, queue=queue)
        first_job = run.job.pk
        # Seven answers come back and are written; the next requests hang in flight.
        deadline = time.time() + 120
        while not (Sample.objects.filter(run=run).count() == 7 and sum(stub.attempts.values()) >= 9):
            assert time.time() < deadline, (Sample.objects.filter(run=run).count(), dict(stub.attempts))
            time.sleep(0.1)
        written_before = set(Sample.objects.filter(run=run).values_list("id", "query_id"))
        os.killpg(w1.pid, signal.SIGKILL)
        w1.wait(timeout=20)
        stub.release()  # hung requests close without an answer; new ones are answered

        # The lost worker's job goes stale (the beat task's check, run here at a later clock).
        assert Job.objects.get(pk=first_job).status == "running"
        failed = jobs_mark_stale(now=timezone.now() + timedelta(seconds=settings.STALE_JOB_SECONDS + 5))
        assert failed == [first_job]
        run = GenerationRun.objects.get(pk=run.pk)
        assert run.status == "failed" and run.stop_reason == "Worker lost"

        w2 = start_worker(queue, "w2")
        run = generation_resume(run=run, user=owner)
        job = wait_job(run.job.pk, timeout=120)
        assert job.status == "succeeded", (job.message, job.error)
        run = GenerationRun.objects.get(pk=run.pk)
        slots = list(Sample.objects.filter(run=run).values_list("query_id", "teacher_id", "sample_index"))
        assert len(slots) == 30 == len(set(slots)) and {q for q, _, _ in slots} == {q.pk for q in queries}
        assert written_before <= set(Sample.objects.filter(run=run).values_list("id", "query_id"))
        # Every query was answered by the server exactly once: no completed call was repeated.
        assert stub.total_completed == 30 and set(stub.completed.values()) == {1}
        assert (run.accepted, run.rejected, run.failed, run.status) == (30, 0, 0, "succeeded")
        assert float(run.cost_usd) == pytest.approx(30 * (20 * 1 + 5 * 2) / 1e6)
    finally:
        for w in (w1, w2):
            if w is not None and w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                try:
                    w.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
        stub.stop()
