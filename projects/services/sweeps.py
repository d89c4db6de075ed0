"""Hyperparameter sweeps, request side and bookkeeping: start a sweep (an Optuna study in the
same PostgreSQL and its first trial), advance it when a trial ends (tell the study the trial's
value, ask the next trial), cancel it.

Each trial is a TrainingRun started through ``training_start`` and trained by the usual
gpu-queue task; nothing here trains. When a trial's job ends, ``training._sync_run`` queues
``workers.tasks.sweep_advance_task`` (default queue) after commit, which calls
``sweep_advance``: under a row lock on the Sweep, it tells every ended trial that the study
still holds as running (COMPLETE with the run's ``best_val_loss``; PRUNED when the early-stop
rule stopped it; FAIL otherwise), then asks the next trial while none is active and fewer than
``n_trials`` were asked. A redelivered or duplicate message finds nothing left to tell or ask,
so it changes nothing. Trials run one after another (one gpu queue).
"""
from __future__ import annotations

import math
import uuid
from functools import lru_cache

from django.db import transaction
from django.utils import timezone

from projects.models import JOB_ENDED, JobStatus, Project, Sweep, TrainingRun
from projects.services import InvalidInput, InvalidState, ServiceError
from projects.services.permissions import ensure_can_write
from projects.services.training import training_cancel, training_start
from workers.pipeline.sweeps import (PRUNED_PREFIX, SweepRefused, check_trials, distributions, make_sampler,
                                     parse_space, trial_overrides)
from workers.pipeline.training import METHODS, TrainingRefused, resolve_hyperparams

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def optuna_storage_url() -> str:
    """The SQLAlchemy URL (``postgresql+psycopg://user:pw@host:port/name[?sslmode=...]``) of
    Django's default database, as the current process sees it (the test database under pytest)."""
    from django.db import connections
    from sqlalchemy.engine import URL

    s = connections["default"].settings_dict
    # The libpq connection settings DATABASE_URL carries (``?sslmode=require`` ...) apply too.
    query = {k: str(v) for k, v in (s.get("OPTIONS") or {}).items() if k in _LIBPQ_OPTIONS}
    return URL.create("postgresql+psycopg", username=s.get("USER") or None, password=s.get("PASSWORD") or None,
                      host=s.get("HOST") or None, port=int(s["PORT"]) if s.get("PORT") else None,
                      database=s["NAME"], query=query).render_as_string(hide_password=False)


_LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                  "target_session_attrs", "options")


@lru_cache(maxsize=4)
def _storage(url: str):
    import optuna
    from sqlalchemy.pool import NullPool

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # NullPool: no connection outlives a call, so forked workers share none and the test
    # database can be dropped at the end of a session.
    return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})


def optuna_storage():
    """Optuna's ``RDBStorage`` on Django's default PostgreSQL database (its tables, ``studies``,
    ``trials``, ``trial_values``, ... are created on first use, beside Django's)."""
    return _storage(optuna_storage_url())


def sweep_study(*, sweep: Sweep):
    """The sweep's Optuna study (direction minimize), loaded from the storage."""
    import optuna

    return optuna.load_study(study_name=sweep.study_name, storage=optuna_storage())


def sweep_start(*, project: Project, method: str, search: str, space: dict, student_model: str = "",
                preset: str = "fast", n_trials: int | None = None, fixed: dict | None = None,
                divergence_patience: int = 2, seed: int = 0, user=None) -> Sweep:
    """Create a Sweep, its Optuna study (RDBStorage in this PostgreSQL) and its first trial
    (a TrainingRun queued on the gpu queue after commit). ``space``: see
    ``workers.pipeline.sweeps`` (grid: values per hyperparameter; random/tpe: values or
    ``low``/``high``/``log``); ``fixed``: overrides every trial shares (e.g. ``{"max_steps":
    20}``); ``n_trials``: grid default (and most) is every point, random/tpe default 10;
    ``divergence_patience``: early-stop a trial whose validation divergence grows this many
    evaluations in a row (0: off).

    Raises NotAllowed (viewer), InvalidInput naming the hyperparameter or setting (unknown
    method/preset/search, a value out of the ``HYPERPARAMS`` range, a hyperparameter both fixed
    and swept, too many trials) and what ``training_start`` raises for the first trial
    (InvalidInput for a refused student, InvalidState for an empty curated dataset); nothing is
    left behind then."""
    import optuna

    ensure_can_write(user=user, team=project.team)
    if method not in METHODS:
        raise InvalidInput(f"method: {method!r} is not one of {', '.join(METHODS)}")
    try:
        norm = parse_space(method=method, search=search, space=space)
        n = check_trials(search=search, space=norm, n_trials=n_trials)
        fixed = dict(fixed or {})
        both = sorted(set(fixed) & set(norm))
        if both:
            raise SweepRefused(f"space: {', '.join(both)} is both fixed and swept; give it in one place")
        hp = resolve_hyperparams(method, preset, fixed)
    except (SweepRefused, TrainingRefused) as exc:
        raise InvalidInput(str(exc)) from None
    fixed = {k: hp[k] for k in fixed}
    if not isinstance(divergence_patience, int) or not 0 <= divergence_patience <= 100:
        raise InvalidInput(f"divergence_patience: give 0 (off) to 100, got {divergence_patience!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise InvalidInput(f"seed: give 0 to {2**31 - 1}, got {seed!r}")
    student_model = (student_model or "").strip()
    if len(student_model) > 300:
        raise InvalidInput(f"student_model: at most 300 characters, got {len(student_model)}")
    study_name = f"distillhub-{project.slug}-{uuid.uuid4().hex[:12]}"
    storage = optuna_storage()
    optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
    try:
        with transaction.atomic():
            sweep = Sweep.objects.create(
                project=project, method=method, student_model=student_model, preset=preset,
                search=search, space=norm, fixed=fixed, n_trials=n, divergence_patience=divergence_patience,
                seed=seed, study_name=study_name, status=JobStatus.RUNNING,
                created_by=user if (user is not None and user.is_authenticated) else None)
            study = sweep_study(sweep=sweep)
            _ask_next(sweep, study, user=user, raise_errors=True)
    except BaseException:
        optuna.delete_study(study_name=study_name, storage=storage)
        raise
    sweep.refresh_from_db()
    return sweep


def _tell_ended(sweep: Sweep, study) -> list[int]:
    """Tell the study every ended trial it still holds as running; return their numbers."""
    from optuna.trial import TrialState

    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    storage = optuna_storage()  # the one the study was loaded with; FrozenTrial._trial_id is its row id
    told = []
    runs = {r.sweep_trial: r for r in TrainingRun.objects.filter(sweep=sweep, sweep_trial__isnull=False)}
    for number, ft in sorted(running.items()):
        run = runs.get(number)
        if run is not None and run.status not in JOB_ENDED:
            continue
        if run is None:  # asked by a transaction that never committed its run
            storage.set_trial_user_attr(ft._trial_id, "stop_reason", "no training run was created for it")
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            told.append(number)
            continue
        storage.set_trial_user_attr(ft._trial_id, "run_id", run.pk)
        for m in run.metrics.filter(split="validation", loss__isnull=False).order_by("step"):
            if math.isfinite(m.loss) and m.step not in ft.intermediate_values:
                storage.set_trial_intermediate_value(ft._trial_id, m.step, m.loss)
        if run.stop_reason:
            storage.set_trial_user_attr(ft._trial_id, "stop_reason", run.stop_reason)
        value = run.best_val_loss
        if run.status == JobStatus.SUCCEEDED and value is not None and math.isfinite(value):
            study.tell(number, values=value, skip_if_finished=True)
        elif run.stop_reason.startswith(PRUNED_PREFIX):
            study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        told.append(number)
    return told


def _finish(sweep: Sweep, study, status: str = "", reason: str = "") -> None:
    from optuna.trial import TrialState

    if not status:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        status = JobStatus.SUCCEEDED if done else JobStatus.FAILED
        reason = reason or ("" if done else "no trial completed")
    Sweep.objects.filter(pk=sweep.pk).update(status=status, stop_reason=reason[:300], finished_at=timezone.now())


def _ask_next(sweep: Sweep, study, *, user=None, raise_errors: bool = False) -> TrainingRun | None:
    """With no trial active: ask the study for the next trial and start its TrainingRun, or end
    the sweep once ``n_trials`` were asked (and told). Call under the sweep's row lock."""
    from optuna.trial import TrialState

    if TrainingRun.objects.filter(sweep=sweep).exclude(status__in=JOB_ENDED).exists():
        return None
    space = distributions(sweep.space)
    while True:
        trials = study.get_trials(deepcopy=False)
        if len(trials) >= sweep.n_trials:
            if all(t.state != TrialState.RUNNING for t in trials):
                _finish(sweep, study)
            return None
        number = len(trials)
        study.sampler = make_sampler(search=sweep.search, space=sweep.space, n_trials=sweep.n_trials,
                                     seed=sweep.seed, trial_number=number)
        trial = study.ask(space)
        try:
            run = training_start(project=sweep.project, method=sweep.method, student_model=sweep.student_model,
                                 preset=sweep.preset, user=user,
                                 overrides={**sweep.fixed, **trial_overrides(trial.params)},
                                 idempotency_key=uuid.uuid5(uuid.NAMESPACE_URL, f"{sweep.study_name}/{trial.number}"))
        except ServiceError as exc:
            trial.set_user_attr("stop_reason", str(exc)[:300])
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if raise_errors:
                raise
            _finish(sweep, study, JobStatus.FAILED, f"trial {trial.number} could not start: {exc}")
            return None
        if run.reused and run.sweep_id != sweep.pk:
            # An identical run (same settings and data) was already active outside this sweep:
            # training_start returned it rather than a second copy; this point is skipped.
            trial.set_user_attr("stop_reason", f"an identical training run ({run.pk}) was already active")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            continue
        # Later trials are started by the worker (user None, a trusted caller); each is
        # attributed to whoever started the sweep.
        TrainingRun.objects.filter(pk=run.pk).update(sweep=sweep, sweep_trial=trial.number,
                                                     created_by=sweep.created_by_id)
        trial.set_user_attr("run_id", run.pk)
        return run


def sweep_advance(*, sweep_id: int) -> dict:
    """Tell the study the trials that ended, then ask the next trial or end the sweep (see the
    module docstring). Idempotent; a missing sweep is a no-op. Returns ``{"sweep", "status",
    "told": [trial numbers], "started": run id or None}``."""
    with transaction.atomic():
        sweep = Sweep.objects.select_for_update().select_related("project").filter(pk=sweep_id).first()
        if sweep is None:
            return {"sweep": sweep_id, "status": None, "told": [], "started": None}
        study = sweep_study(sweep=sweep)
        told = _tell_ended(sweep, study)
        run = None
        if sweep.status in ACTIVE:
            run = _ask_next(sweep, study)
        elif not TrainingRun.objects.filter(sweep=sweep).exclude(status__in=JOB_ENDED).exists() \
                and sweep.finished_at is None:
            Sweep.objects.filter(pk=sweep.pk).update(finished_at=timezone.now())
        sweep.refresh_from_db()
        return {"sweep": sweep.pk, "status": sweep.status, "told": told, "started": run.pk if run else None}


def sweeps_stalled() -> list[int]:
    """Ids of running sweeps with no queued or running trial: their advance after a trial's end
    was lost, or is about to run (advancing them again is harmless)."""
    active = TrainingRun.objects.filter(sweep__isnull=False).exclude(status__in=JOB_ENDED).values("sweep_id")
    return list(Sweep.objects.filter(status__in=ACTIVE).exclude(pk__in=active).values_list("pk", flat=True))


def sweep_cancel(*, sweep: Sweep, user=None) -> Sweep:
    """Stop a sweep: no further trial is asked, and its active trial is cancelled (it ends
    within seconds; the study then records it as failed). Raises NotAllowed for viewers and
    InvalidState when the sweep has ended."""
    ensure_can_write(user=user, team=sweep.project.team)
    with transaction.atomic():
        locked = Sweep.objects.select_for_update().get(pk=sweep.pk)
        if locked.status not in ACTIVE:
            raise InvalidState(f"sweep {sweep.pk} has already ended ({locked.status})")
        Sweep.objects.filter(pk=sweep.pk).update(status=JobStatus.CANCELLED, stop_reason="cancelled by user",
                                                 finished_at=timezone.now())
        for run in TrainingRun.objects.filter(sweep=sweep).exclude(status__in=JOB_ENDED).select_related("job"):
            if run.job is not None and run.job.status not in JOB_ENDED:
                training_cancel(run=run, user=user)
    sweep.refresh_from_db()
    return sweep


def sweep_ended_trial_hook(*, run: TrainingRun) -> None:
    """Called when a trial's job has ended (inside the transaction that ends it): queue
    ``sweep_advance_task`` for its sweep once that transaction commits."""
    from projects.services.jobs import task_send

    if run.sweep_id is None:
        return
    sweep_id = run.sweep_id
    transaction.on_commit(lambda: task_send(name="workers.tasks.sweep_advance_task", args=[sweep_id]))
