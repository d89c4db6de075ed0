"""Verbs: ``sweep`` (a hyperparameter sweep of training runs, searched by Optuna) and
``sweep-cancel``."""
from __future__ import annotations

import sys
import time

from projects import selectors
from projects.cli import CliError
from projects.cli.foundation import get_project
from projects.cli.training import overrides_from_sets
from projects.models import JOB_ENDED, Sweep, TrainingMethod
from projects.services.sweeps import sweep_cancel, sweep_start
from workers.pipeline.sweeps import SEARCHES, SweepRefused, parse_param_text
from workers.pipeline.training import PRESET_NAMES


def register(sub) -> None:
    p = sub.add_parser("sweep", help="a hyperparameter sweep: training runs whose settings Optuna searches")
    p.add_argument("--project", required=True)
    p.add_argument("--method", required=True, choices=TrainingMethod.values)
    p.add_argument("--student", default="", help="as for train (default: the method's)")
    p.add_argument("--preset", default="fast", choices=list(PRESET_NAMES))
    p.add_argument("--search", default="grid", choices=list(SEARCHES),
                   help="grid: every combination; random; tpe: Bayesian (Optuna's TPE)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2|NAME=LOW:HIGH[:log]",
                   help="a swept hyperparameter (repeatable): values, or a range for random/tpe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter every trial shares (repeatable), e.g. --set max_steps=20")
    p.add_argument("--trials", type=int, help="number of trials (grid: default and at most every point; else 10)")
    p.add_argument("--patience", type=int, default=2,
                   help="stop (prune) a trial whose validation divergence from the teacher grows this many "
                        "evaluations in a row; 0: off (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="block until every trial has ended")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("sweep-cancel", help="cancel a sweep: no further trial, its active trial cancelled")
    p.add_argument("sweep", type=int)
    p.set_defaults(handler=cmd_sweep_cancel)


def sweep_summary(sweep: Sweep) -> dict:
    """``{sweep, status, search, n_trials, study, stop_reason, trials: [{trial, state, params,
    value, run, status, best_val_loss, fidelity, stop_reason, ...}], best: trial or None}``."""
    sweep.refresh_from_db()
    table = selectors.sweep_trials(sweep)
    return {"sweep": sweep.pk, "status": sweep.status, "method": sweep.method, "search": sweep.search,
            "n_trials": sweep.n_trials, "study": sweep.study_name, "stop_reason": sweep.stop_reason,
            "space": sweep.space, "fixed": sweep.fixed, "trials": table["trials"], "best": table["best"]}


def _human(summary: dict) -> str:
    names = list(summary["space"])
    lines = [f"sweep {summary['sweep']} ({summary['search']}, {summary['status']}): "
             f"{len(summary['trials'])}/{summary['n_trials']} trials, study {summary['study']}"]
    lines.append("  ".join(["trial", "run", "state", *names, "val_loss", "fidelity"]))
    for t in summary["trials"]:
        fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append("  ".join([("*" if t["best"] else "") + str(t["trial"]), fmt(t["run"]), t["state"],
                                *(fmt(t["params"].get(n)) for n in names), fmt(t["best_val_loss"]),
                                fmt(t["fidelity"])]))
    return "\n".join(lines)


def _wait(sweep: Sweep) -> None:
    last = None
    while True:
        sweep.refresh_from_db()
        active = sweep.trials.exclude(status__in=JOB_ENDED).count()
        line = f"[sweep {sweep.pk}] {sweep.status}: {sweep.trials.count()}/{sweep.n_trials} trials, {active} active"
        if line != last:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last = line
        if sweep.status in JOB_ENDED and active == 0:
            return
        time.sleep(1.0)


def cmd_sweep(o: dict) -> dict:
    project = get_project(o["project"])
    space: dict = {}
    try:
        for item in o["param"]:
            name, spec = parse_param_text(item)
            if name in space:
                raise CliError(f"--param: {name!r} given twice")
            space[name] = spec
    except SweepRefused as exc:
        raise CliError(f"--{exc}") from None
    fixed = overrides_from_sets(o["set"])
    sweep = sweep_start(project=project, method=o["method"], student_model=o["student"], preset=o["preset"],
                        search=o["search"], space=space, n_trials=o.get("trials"), fixed=fixed,
                        divergence_patience=o["patience"], seed=o["seed"])
    if o.get("wait"):
        _wait(sweep)
    result = sweep_summary(sweep)
    result["_human"] = _human(result)
    if o.get("wait") and result["status"] != "succeeded":
        from projects.cli import emit

        emit(o, {k: v for k, v in result.items() if k != "_human"}, result["_human"])
        raise CliError(f"sweep {sweep.pk} ended {result['status']}: {result['stop_reason']}")
    return result


def cmd_sweep_cancel(o: dict) -> dict:
    sweep = Sweep.objects.filter(pk=o["sweep"]).first()
    if sweep is None:
        raise CliError(f"sweep-cancel: no sweep with id {o['sweep']}")
    sweep = sweep_cancel(sweep=sweep)
    return sweep_summary(sweep)
