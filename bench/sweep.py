"""Benchmark: what a hyperparameter sweep costs beyond its trials' own training, per trial.

A grid sweep of classifier-kd on the bundled MiniLM (BANKING77 queries, soft labels 0.7 on the
gold label) runs through a real Celery worker (queues default and gpu, one process) on a
dedicated database, ``<your database>_bench_sweep`` (created if missing and migrated). Measured:

- ``wall_s``: from the ``sweep_start`` call until every trial has ended and the sweep is
  finished (its last ``sweep_advance`` ran).
- ``trial_job_s``: each trial's own job time (its Job's ``finished_at - started_at``: loading
  the student, training, validating, saving the artifacts).
- ``overhead_s_per_trial`` = (``wall_s`` - sum of ``trial_job_s``) / trials: queueing the
  trial, the worker picking it up, telling Optuna (RDBStorage in the same PostgreSQL), asking
  the next trial and starting its TrainingRun. ``gap_s_mean``: mean time between one trial's
  job ending and the next one's starting.

    python bench/sweep.py [--quick] [--trials N] [--steps N]

Its data folder (checkpoints and artifacts of every trial, about 0.6 GB a trial) is a temporary
one, removed at the end unless ``BENCH_KEEP=1``.

Last line: one JSON object with ``trials``, ``wall_s``, ``trial_job_s_total``,
``overhead_s_per_trial``, ``gap_s_mean``, ``steps_per_trial``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))


def _bench_db_url() -> str:
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/distillhub"))
    name = cfg["NAME"] + "_bench_sweep"
    admin = psycopg.connect(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432, user=cfg["USER"] or "postgres",
                            password=cfg.get("PASSWORD") or None, dbname="postgres", autocommit=True)
    if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
        admin.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    auth = (cfg["USER"] or "postgres") + (":" + cfg["PASSWORD"] if cfg.get("PASSWORD") else "")
    return f"postgres://{auth}@{cfg['HOST'] or '127.0.0.1'}:{cfg['PORT'] or 5432}/{name}"


def _project(n_labels: int, per_label: int, val_per_label: int):
    from projects.services.teams import team_create
    from tests.training_data import curated_banking

    team = team_create(name=f"Sweep bench {int(time.time())}")
    return curated_banking(team, None, DATA, n_labels=n_labels, train_per_label=per_label,
                           val_per_label=val_per_label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 trials of 4 steps (about a minute)")
    ap.add_argument("--trials", type=int, help="grid points (learning rates); default 4, quick 2")
    ap.add_argument("--steps", type=int, help="max_steps per trial; default 20, quick 4")
    a = ap.parse_args()
    trials = a.trials or (2 if a.quick else 4)
    steps = a.steps or (4 if a.quick else 20)

    data_dir = tempfile.mkdtemp(prefix="bench-sweep-")
    os.environ["DATABASE_URL"] = _bench_db_url()
    os.environ["DISTILLHUB_DATA_DIR"] = data_dir
    os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from projects.models import JOB_ENDED, Sweep
    from projects.services.sweeps import sweep_start

    log = open(Path(data_dir) / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "distillhub", "worker", "-Q", "default,gpu", "--concurrency", "1",
         "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
         "--hostname", f"bench-sweep-{os.getpid()}@%h"],
        cwd=str(REPO), env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(8)  # the worker's start (Django, Celery) is not the sweep's cost
        project = _project(n_labels=6, per_label=8, val_per_label=2)
        lrs = [str(1e-4 * (1 + i)) for i in range(trials)]
        t0 = time.time()
        sweep = sweep_start(project=project, method="classifier-kd", student_model="minilm-l6", search="grid",
                            space={"learning_rate": {"values": lrs}},
                            fixed={"max_steps": steps, "eval_steps": max(1, steps // 2), "early_stopping_patience": 0,
                                   "per_device_train_batch_size": 8, "logging_steps": max(1, steps // 2)},
                            divergence_patience=0)
        deadline = t0 + 60 * 60
        while True:
            sweep.refresh_from_db()
            if sweep.status in JOB_ENDED and not sweep.trials.exclude(status__in=JOB_ENDED).exists():
                break
            if time.time() > deadline or worker.poll() is not None:
                raise SystemExit(f"the sweep did not end; see {log.name}")
            time.sleep(0.2)
        wall = time.time() - t0
        sweep = Sweep.objects.get(pk=sweep.pk)
        runs = list(sweep.trials.select_related("job").order_by("sweep_trial"))
        jobs = [(r.job.started_at, r.job.finished_at) for r in runs]
        job_s = [(f - s).total_seconds() for s, f in jobs]
        gaps = [(jobs[i + 1][0] - jobs[i][1]).total_seconds() for i in range(len(jobs) - 1)]
        overhead = (wall - sum(job_s)) / len(runs)
        print(f"sweep {sweep.pk}: {len(runs)} trials of {steps} steps, status {sweep.status}")
        for r, s in zip(runs, job_s):
            print(f"  trial {r.sweep_trial}: lr {r.hyperparams['learning_rate']:g}  job {s:6.2f} s  "
                  f"best val. loss {r.best_val_loss}")
        print(f"wall time {wall:.2f} s; trials' own job time {sum(job_s):.2f} s")
        print(f"overhead per trial {overhead:.3f} s (mean gap between trials {sum(gaps) / len(gaps) if gaps else 0:.3f} s)")
        print(json.dumps({"trials": len(runs), "steps_per_trial": steps, "wall_s": round(wall, 3),
                          "trial_job_s_total": round(sum(job_s), 3), "overhead_s_per_trial": round(overhead, 3),
                          "gap_s_mean": round(sum(gaps) / len(gaps), 3) if gaps else None,
                          "status": sweep.status}))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if not os.environ.get("BENCH_KEEP"):  # the trials' checkpoints and artifacts: GBs
            import shutil

            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
