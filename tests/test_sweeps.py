"""Hyperparameter sweeps through the service, the Optuna study in the test PostgreSQL, the real
Celery worker and the CLI: a grid over classifier-kd on minilm-l6 with a tiny dataset."""
import json
import os
import re

import optuna
import pytest
from django.core.management import call_command
from django.urls import reverse
from optuna.trial import TrialState

from projects.models import JobStatus, Sweep, TrainingRun
from projects.services import InvalidInput, InvalidState
from projects.services.sweeps import (optuna_storage, optuna_storage_url, sweep_advance, sweep_start, sweep_study,
                                     sweeps_stalled)
from tests.test_training import curated_banking

os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")

TINY = {"max_steps": 4, "eval_steps": 2, "per_device_train_batch_size": 8, "early_stopping_patience": 0,
        "logging_steps": 2}


def _end(run: TrainingRun, *, status: str, best_val_loss=None, stop_reason: str = "") -> None:
    """What the worker writes when a trial's job ends (the worker itself runs in the last test)."""
    TrainingRun.objects.filter(pk=run.pk).update(status=status, best_val_loss=best_val_loss, stop_reason=stop_reason)


@pytest.mark.django_db
def test_sweep_tells_the_study_and_asks_the_next_trial(team, owner, shared_data, client):
    project = curated_banking(team, owner, shared_data, n_labels=4, train_per_label=4, val_per_label=2)
    from django.db import connection

    assert optuna_storage_url().startswith("postgresql+psycopg://")
    assert optuna_storage_url().endswith("/" + connection.settings_dict["NAME"])  # the test database
    sweep = sweep_start(project=project, method="classifier-kd", student_model="minilm-l6", search="grid",
                        space={"alpha": {"values": ["0.3", "0.7"]}, "temperature": {"values": [2, 4]}},
                        n_trials=3, fixed=TINY, user=owner)
    assert (sweep.status, sweep.n_trials, sweep.fixed["max_steps"]) == ("running", 3, 4)
    assert sweep.space == {"alpha": {"values": [0.3, 0.7]}, "temperature": {"values": [2.0, 4.0]}}
    [first] = sweep.trials.all()
    study = sweep_study(sweep=sweep)
    [t0] = study.get_trials()
    assert (t0.number, t0.state, first.sweep_trial) == (0, TrialState.RUNNING, 0)
    assert first.hyperparams["alpha"] == t0.params["alpha"] and first.hyperparams["max_steps"] == 4
    assert first.status == "queued" and first.job.status == "queued"
    assert sweeps_stalled() == []  # its first trial is queued
    # Nothing has ended: a (redelivered) advance changes nothing.
    assert sweep_advance(sweep_id=sweep.pk) == {"sweep": sweep.pk, "status": "running", "told": [], "started": None}
    _end(first, status="succeeded", best_val_loss=0.8125)
    assert sweeps_stalled() == [sweep.pk]  # no trial active: beat's catch-up would advance it
    res = sweep_advance(sweep_id=sweep.pk)
    assert res["told"] == [0] and res["started"] is not None
    second = TrainingRun.objects.get(pk=res["started"])
    assert second.sweep_trial == 1 and second.created_by == owner == first.created_by
    _end(second, status="failed", stop_reason="pruned: validation fidelity fell for 2 consecutive evaluations")
    res = sweep_advance(sweep_id=sweep.pk)
    assert res["told"] == [1]
    assert sweep_advance(sweep_id=sweep.pk)["told"] == []  # idempotent
    third = TrainingRun.objects.get(pk=res["started"])
    _end(third, status="succeeded", best_val_loss=0.5)
    assert sweep_advance(sweep_id=sweep.pk) == {"sweep": sweep.pk, "status": "succeeded", "told": [2], "started": None}
    trials = sweep_study(sweep=sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.value for t in trials] == [0.8125, None, 0.5]
    assert trials[1].user_attrs["stop_reason"].startswith("pruned:")
    # Three distinct grid points, each the hyperparameters its run trained with.
    points = {(t.params["alpha"], t.params["temperature"]) for t in trials}
    assert len(points) == 3
    for t in trials:
        run = TrainingRun.objects.get(sweep=sweep, sweep_trial=t.number)
        assert (run.hyperparams["alpha"], run.hyperparams["temperature"]) == (t.params["alpha"], t.params["temperature"])
    from projects.selectors import sweep_trials

    table = sweep_trials(Sweep.objects.get(pk=sweep.pk))
    assert table["best"]["trial"] == 2 and table["best"]["value"] == 0.5 and table["params"] == ["alpha", "temperature"]
    assert [r["state"] for r in table["trials"]] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [r["fidelity"] for r in table["trials"]] == [None, None, None]  # no metrics were logged here
    # The sweep page: one table, the best row highlighted, the charts, no more polling.
    client.force_login(owner)
    page = client.get(reverse("sweep_page", kwargs={"slug": project.slug, "sweep_id": sweep.pk})).content.decode()
    assert "sweep-trials" in page and page.count('class="best"') == 1 and "0.5000" in page and "0.8125" in page
    assert "Best: trial 2" in page and "pruned" in page and "fell for 2 consecutive" in page
    assert "plotly/plotly.min.js" in page and 'id="chart-objective"' in page and 'id="chart-parallel"' in page
    assert "hx-get" not in page
    listing = client.get(reverse("training_page", kwargs={"slug": project.slug})).content.decode()
    assert f"Sweep {sweep.pk}" in listing and "Start a sweep" in listing


@pytest.mark.django_db
def test_sweep_refuses_bad_spaces_and_leaves_nothing_behind(team, owner, viewer, shared_data):
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=1)
    before = len(optuna.get_all_study_names(storage=optuna_storage()))
    cases = [
        (dict(search="grid", space={"alpha": {"values": [0.2, 1.2]}}), "'alpha' must be in \\[0, 1\\]"),
        (dict(search="grid", space={"alpha": {"values": [0.2]}}, n_trials=2), "the grid has 1 points"),
        (dict(search="random", space={"alpha": {"low": 0.1, "high": 0.9}}, fixed={"alpha": 0.5}),
         "alpha is both fixed and swept"),
        (dict(search="tpe", space={"lora_r": {"low": 4, "high": 16}}), "'lora_r' is not a setting of classifier-kd"),
        (dict(search="random", space={"alpha": {"low": 0.1, "high": 0.9}}, fixed={"max_steps": 0.5}),
         "'max_steps'"),
    ]
    for kw, msg in cases:
        with pytest.raises(InvalidInput, match=msg):
            sweep_start(project=project, method="classifier-kd", user=owner, **kw)
    empty = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=0, val_per_label=0)
    with pytest.raises(InvalidState, match="curated dataset is empty"):
        sweep_start(project=empty, method="classifier-kd", search="grid", space={"alpha": {"values": [0.5]}}, user=owner)
    assert not Sweep.objects.exists() and not TrainingRun.objects.exists()
    assert len(optuna.get_all_study_names(storage=optuna_storage())) == before  # the study was removed too
    from projects.services import NotAllowed

    with pytest.raises(NotAllowed):
        sweep_start(project=project, method="classifier-kd", search="grid", space={"alpha": {"values": [0.5]}},
                    user=viewer)


@pytest.mark.django_db
def test_sweep_form_on_the_students_page(team, owner, shared_data, client):
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    client.force_login(owner)
    url = reverse("sweep_start", kwargs={"slug": project.slug})
    form = {"sweep-method": "classifier-kd", "sweep-student_model": "minilm-l6", "sweep-preset": "fast",
            "sweep-search": "grid", "sweep-space": "temperature=2,200\nalpha=0.5", "sweep-fixed": "max_steps=4",
            "sweep-divergence_patience": "2"}
    r = client.post(url, form)
    assert r.status_code == 400 and "hyperparameter &#x27;temperature&#x27; must be in [0.01, 100], got 200" in r.content.decode()
    r = client.post(url, {**form, "sweep-space": "temperature=2,4:8"})
    assert r.status_code == 400 and "&#x27;temperature&#x27; is a range; a grid search needs a list" in r.content.decode()
    r = client.post(url, {**form, "sweep-space": "alpha=0.5\ntemperature"})
    assert r.status_code == 400 and "line 2: param: &#x27;temperature&#x27; is not NAME=V1,V2" in r.content.decode()
    assert not Sweep.objects.exists()
    r = client.post(url, {**form, "sweep-space": "temperature=2,4\nalpha=0.5"})
    sweep = Sweep.objects.get()
    assert r.status_code == 302 and r["Location"] == reverse("sweep_page", kwargs={"slug": project.slug, "sweep_id": sweep.pk})
    assert (sweep.n_trials, sweep.fixed, sweep.divergence_patience) == (2, {"max_steps": 4}, 2)
    [run] = sweep.trials.all()
    assert run.hyperparams["temperature"] in (2.0, 4.0) and run.hyperparams["max_steps"] == 4
    page = client.get(r["Location"]).content.decode()
    assert "hx-get" in page and "Cancel sweep" in page  # a trial is queued: the table polls
    listing = client.get(reverse("training_page", kwargs={"slug": project.slug})).content.decode()
    ids = re.findall(r'id="(id_[^"]+)"', listing)
    assert len(ids) == len(set(ids)) and "id_sweep-space" in ids  # the Train and Sweep forms share the page
    r = client.post(reverse("sweep_cancel", kwargs={"slug": project.slug, "sweep_id": sweep.pk}))
    sweep.refresh_from_db()
    run.refresh_from_db()
    assert sweep.status == "cancelled" and run.status == "cancelled" and run.job.status == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_sweep_cli_grid_through_the_worker(celery_worker, team, owner, shared_data, capsys):
    project = curated_banking(team, owner, shared_data, n_labels=4, train_per_label=4, val_per_label=2)
    args = ["distill", "sweep", "--project", project.slug, "--method", "classifier-kd", "--student", "minilm-l6",
            "--search", "grid", "--param", "learning_rate=1e-4,3e-4", "--param", "alpha=0.5"]
    for k, v in TINY.items():
        args += ["--set", f"{k}={v}"]
    call_command(*args, "--wait", "--json")
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["status"] == "succeeded", res
    assert len(res["trials"]) == 2 and all(t["state"] == "COMPLETE" for t in res["trials"])
    assert {t["params"]["learning_rate"] for t in res["trials"]} == {1e-4, 3e-4}
    sweep = Sweep.objects.get(pk=res["sweep"])
    # The study lives in the test PostgreSQL: read it back through a fresh Optuna storage.
    from sqlalchemy.pool import NullPool

    fresh = optuna.storages.RDBStorage(optuna_storage_url(), engine_kwargs={"poolclass": NullPool})
    trials = optuna.load_study(study_name=sweep.study_name, storage=fresh).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    for t in trials:
        run = TrainingRun.objects.get(sweep=sweep, sweep_trial=t.number)
        assert run.status == JobStatus.SUCCEEDED and run.best_val_loss is not None
        assert t.value == run.best_val_loss and t.user_attrs["run_id"] == run.pk
        assert run.hyperparams["learning_rate"] == t.params["learning_rate"] and run.hyperparams["max_steps"] == 4
        assert sorted(t.intermediate_values) == [2, 4]  # the validation losses, by step
        assert min(t.intermediate_values.values()) == pytest.approx(run.best_val_loss)
    best = min(trials, key=lambda t: t.value)
    assert res["best"]["trial"] == best.number and res["best"]["value"] == best.value
    assert any(line.startswith("*") for line in out)  # the human table marks the best trial


def swapped_validation(team, owner, shared_data, *, per_label=8):
    """Two labels; the validation queries repeat training queries with the teacher's label
    swapped, so the better the student learns the training rows, the less it agrees with the
    teacher on validation: its fidelity falls as it trains."""
    import csv

    from projects.models import GenerationRun, Query, Sample, Teacher
    from projects.services.projects import project_create

    rows = list(csv.DictReader(open(shared_data / "banking77" / "train.csv", encoding="utf-8")))
    labels = sorted({r["category"] for r in rows})[:2]
    project = project_create(team=team, user=owner, name="Swapped", task_type="classification", labels=labels,
                             instructions="Classify the banking customer's message.")
    teacher = Teacher.objects.create(project=project, name="t", provider="openai", model="gpt-x")
    gen = GenerationRun.objects.create(project=project, status="succeeded")
    gen.teachers.add(teacher)
    picked = [r for l in labels for r in [r for r in rows if r["category"] == l][:per_label]]
    for i, r in enumerate(picked):
        for split, label in (("train", r["category"]), ("validation", labels[1 - labels.index(r["category"])])):
            q = Query.objects.create(project=project, text=r["text"] + ("" if split == "train" else " ?"),
                                     text_hash=f"{split}{i}", split=split, reference=label)
            probs = {l: (0.95 if l == label else 0.05) for l in labels}
            Sample.objects.create(run=gen, query=q, teacher=teacher, response=label, parsed=label,
                                  label_probs=probs, status="accepted")
    return project


@pytest.mark.django_db(transaction=True)
def test_a_trial_whose_fidelity_falls_is_pruned(celery_worker, team, owner, shared_data):
    from tests.conftest import wait_job

    project = swapped_validation(team, owner, shared_data)
    sweep = sweep_start(project=project, method="classifier-kd", student_model="minilm-l6", search="grid",
                        space={"learning_rate": {"values": [3e-4]}}, divergence_patience=1,
                        fixed={"max_steps": 12, "eval_steps": 1, "per_device_train_batch_size": 4,
                               "early_stopping_patience": 0, "logging_steps": 1}, user=owner)
    [run] = sweep.trials.all()
    job = wait_job(run.job_id, timeout=240)
    run.refresh_from_db()
    assert job.status == "failed" and run.stop_reason.startswith("pruned: validation fidelity fell for 1 "), run.stop_reason
    fid = [m.fidelity for m in run.metrics.filter(split="validation").order_by("step")]
    assert len(fid) < 12 and fid[-1] < fid[-2]  # stopped at the first fall, before the last step
    assert not run.artifacts.exists()
    import time

    deadline = time.time() + 240  # the worker may be busy on a loaded machine; ends when the sweep does
    while Sweep.objects.get(pk=sweep.pk).status == "running":
        assert time.time() < deadline, "the sweep did not end"
        time.sleep(0.3)
    sweep.refresh_from_db()
    [t] = sweep_study(sweep=sweep).get_trials()
    assert t.state == TrialState.PRUNED and t.user_attrs["stop_reason"] == run.stop_reason
    assert sweep.status == "failed" and sweep.stop_reason == "no trial completed"


def test_optuna_storage_url_follows_the_database_settings(settings):
    from django.db import connections

    s = connections["default"].settings_dict
    saved = dict(s)
    try:
        s.update(USER="dh", PASSWORD="p@ss/word", HOST="db.internal", PORT="6432", NAME="distill",
                 OPTIONS={"sslmode": "require", "pool": True})
        assert optuna_storage_url() == "postgresql+psycopg://dh:p%40ss%2Fword@db.internal:6432/distill?sslmode=require"
    finally:
        s.clear()
        s.update(saved)


@pytest.mark.django_db
def test_sweep_cli_refuses_a_bad_param_naming_it(team, owner, shared_data, capsys):
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=1)
    base = ["distill", "sweep", "--project", project.slug, "--method", "classifier-kd"]
    for extra, msg in ((["--param", "alpha=0.3,1.5"], "error: space: a value of hyperparameter 'alpha' must be in [0, 1], got 1.5"),
                       (["--param", "alpha"], "error: --param: 'alpha' is not NAME=V1,V2 or NAME=LOW:HIGH[:log]"),
                       (["--param", "alpha=0.3", "--param", "alpha=0.5"], "error: --param: 'alpha' given twice"),
                       (["--search", "random", "--param", "alpha=0.1:0.9", "--trials", "500"],
                        "error: n_trials: give 1 to 200, got 500")):
        with pytest.raises(SystemExit) as info:
            call_command(*base, *extra, "--json")
        assert info.value.code == 1
        assert msg in capsys.readouterr().err
    assert not Sweep.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_advance_delivered_twice_at_once_starts_one_trial(team, owner, shared_data, monkeypatch):
    """The advance message after a trial's end, redelivered and run by two workers at the same
    time (two connections): one tells the study and starts the next trial, the other finds
    nothing left to do. The trials' training tasks are not queued here (a worker left running by
    another test would train them and advance the sweep itself)."""
    import threading

    from django.db import connection

    monkeypatch.setattr("projects.services.training._enqueue", lambda job: None)
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=1)
    sweep = sweep_start(project=project, method="classifier-kd", student_model="minilm-l6", search="grid",
                        space={"alpha": {"values": [0.3, 0.5, 0.7]}}, fixed=TINY, user=owner)
    [first] = sweep.trials.all()
    _end(first, status="succeeded", best_val_loss=0.75)
    barrier, results = threading.Barrier(2), []

    def advance() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(sweep_advance(sweep_id=sweep.pk))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=advance) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(r["told"] for r in results) == [[], [0]]
    assert sorted(r["started"] is None for r in results) == [False, True]
    assert sweep.trials.count() == 2
    assert [t.state for t in sweep_study(sweep=sweep).get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]


@pytest.mark.django_db
def test_a_student_name_over_300_characters_is_refused_naming_it(team, owner, shared_data):
    """Was a DataError from the Sweep row's varchar(300) (a traceback from ``distill sweep
    --student``); now InvalidInput naming student_model, with no study left behind."""
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=2, val_per_label=1)
    before = len(optuna.get_all_study_names(storage=optuna_storage()))
    with pytest.raises(InvalidInput, match=r"^student_model: at most 300 characters, got 301"):
        sweep_start(project=project, method="classifier-kd", student_model="a" * 301, search="grid",
                    space={"alpha": {"values": [0.5]}}, user=owner)
    assert not Sweep.objects.exists() and not TrainingRun.objects.exists()
    assert len(optuna.get_all_study_names(storage=optuna_storage())) == before


@pytest.mark.django_db
@pytest.mark.parametrize("task_type", ["classification", "generation"])
def test_the_prefilled_sweep_form_is_a_valid_space_for_its_method(owner_client, team, owner, task_type):
    """The Students page's Sweep form starts with a method and a space; for a generation project
    (sft-lora) its space swept ``alpha``, a setting sft-lora does not have, so submitting the
    form as shown was refused."""
    from projects.forms import SweepForm
    from projects.services.projects import project_create
    from workers.pipeline.sweeps import parse_space

    project = project_create(team=team, user=owner, name=f"P {task_type}", task_type=task_type,
                             labels=["a", "b"] if task_type == "classification" else None)
    r = owner_client.get(reverse("training_page", kwargs={"slug": project.slug}))
    initial = r.context["sweep_form"].initial
    form = SweepForm({f"sweep-{k}": v for k, v in initial.items()})
    assert form.is_valid(), form.errors
    space = parse_space(method=initial["method"], search=initial["search"], space=form.cleaned_data["space"])
    assert "learning_rate" in space and len(space) == 2
