"""Hyperparameter sweeps (no Django): the search space a user gives, checked against the
training hyperparameters' ranges (``workers.pipeline.training.HYPERPARAMS``), turned into Optuna
distributions and a sampler, and the early-stop rule for a trial whose student-teacher
divergence grows.

A space is ``{name: spec}`` where ``spec`` is ``{"values": [...]}`` (a grid axis, or a
categorical choice in random/TPE search) or ``{"low": x, "high": y, "log": bool}`` (a range, for
random/TPE search only). The text form, used by ``distill sweep --param`` and the Sweep form, is
``name=v1,v2,...`` for values and ``name=low:high`` or ``name=low:high:log`` for a range.

Searches: ``grid`` (Optuna ``GridSampler``: every combination once), ``random``
(``RandomSampler``), ``tpe`` (``TPESampler``, Bayesian optimisation with a tree-structured
Parzen estimator; Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011).
"""
from __future__ import annotations

import math
from itertools import product

from workers.pipeline.training import HYPERPARAMS, PRESETS, TrainingRefused, convert_hyperparam, describe_range

SEARCHES = ("grid", "random", "tpe")
#: At most this many hyperparameters in one space, values on one grid axis, grid points, trials.
MAX_PARAMS = 8
MAX_VALUES = 50
MAX_TRIALS = 200
#: Settings a sweep may vary: numbers and the fixed-choice texts; not lists, booleans, free text.
SWEEPABLE = tuple(sorted(n for n, h in HYPERPARAMS.items()
                         if h.type in (int, float) or (h.type is str and h.choices)))
#: A trial stopped by the early-stop rule has a ``stop_reason`` starting with this.
PRUNED_PREFIX = "pruned:"


class SweepRefused(ValueError):
    """The sweep cannot start (a bad space, search or trial count); the message names the
    hyperparameter or setting and its valid values."""


def parse_param_text(text: str) -> tuple[str, dict]:
    """``"learning_rate=1e-4,3e-4"`` -> ``("learning_rate", {"values": ["1e-4", "3e-4"]})``;
    ``"learning_rate=1e-5:1e-3:log"`` -> ``("learning_rate", {"low": "1e-5", "high": "1e-3",
    "log": True})``. Values stay text; ``parse_space`` converts them. Raises SweepRefused on
    text that is neither form."""
    if "=" not in text:
        raise SweepRefused(f"param: {text!r} is not NAME=V1,V2 or NAME=LOW:HIGH[:log]")
    name, _, rest = text.partition("=")
    name, rest = name.strip(), rest.strip()
    if not name or not rest:
        raise SweepRefused(f"param: {text!r} is not NAME=V1,V2 or NAME=LOW:HIGH[:log]")
    if ":" in rest:
        parts = [p.strip() for p in rest.split(":")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() not in ("log", "linear")):
            raise SweepRefused(f"param {name!r}: a range is LOW:HIGH or LOW:HIGH:log, got {rest!r}")
        return name, {"low": parts[0], "high": parts[1], "log": len(parts) == 3 and parts[2].lower() == "log"}
    return name, {"values": [v.strip() for v in rest.split(",") if v.strip()]}


def _convert(name: str, value, what: str):
    try:
        return convert_hyperparam(name, value)
    except TrainingRefused as exc:
        raise SweepRefused(f"space: {what} of {exc}") from None


def parse_space(*, method: str, search: str, space: dict) -> dict[str, dict]:
    """Check ``space`` (see the module docstring) for ``method`` and ``search`` and return it
    normalised: values converted to the hyperparameter's type, ``{"values": [...]}`` or
    ``{"low", "high", "log"}``. Raises SweepRefused naming the hyperparameter: unknown search,
    empty or too large space, a setting the method does not have or a sweep cannot vary, a value
    out of its ``HYPERPARAMS`` range, a range in a grid, low >= high, log with low <= 0."""
    if search not in SEARCHES:
        raise SweepRefused(f"search: {search!r} is not one of {', '.join(SEARCHES)}")
    if method not in PRESETS:
        raise SweepRefused(f"method: {method!r} is not one of {', '.join(PRESETS)}")
    if not isinstance(space, dict) or not space:
        raise SweepRefused("space: give at least one hyperparameter to vary, e.g. learning_rate=1e-4,3e-4")
    if len(space) > MAX_PARAMS:
        raise SweepRefused(f"space: at most {MAX_PARAMS} hyperparameters, got {len(space)}")
    settings = PRESETS[method]["fast"]
    out: dict[str, dict] = {}
    for name, spec in space.items():
        if name not in HYPERPARAMS:
            raise SweepRefused(f"space: {name!r} is not a hyperparameter; sweepable: {', '.join(SWEEPABLE)}")
        if name not in settings:
            raise SweepRefused(f"space: {name!r} is not a setting of {method}")
        if name not in SWEEPABLE:
            raise SweepRefused(f"space: {name!r} cannot be swept (only numbers and fixed choices); "
                               f"sweepable: {', '.join(SWEEPABLE)}")
        if not isinstance(spec, dict):
            raise SweepRefused(f"space: {name!r} needs {{\"values\": [...]}} or {{\"low\", \"high\"}}")
        if "values" in spec:
            values = spec["values"]
            if not isinstance(values, (list, tuple)) or not values:
                raise SweepRefused(f"space: {name!r} needs at least one value")
            if len(values) > MAX_VALUES:
                raise SweepRefused(f"space: {name!r} has {len(values)} values; at most {MAX_VALUES}")
            conv = []
            for v in values:
                c = _convert(name, v, "a value")
                if c not in conv:
                    conv.append(c)
            out[name] = {"values": conv}
            continue
        if search == "grid":
            raise SweepRefused(f"space: {name!r} is a range; a grid search needs a list of values "
                               f"(e.g. {name}=v1,v2)")
        if "low" not in spec or "high" not in spec:
            raise SweepRefused(f"space: {name!r} needs values or low and high")
        if HYPERPARAMS[name].type is str:
            raise SweepRefused(f"space: {name!r} takes a list of values ({describe_range(name)}), not a range")
        low, high = _convert(name, spec["low"], "the low end"), _convert(name, spec["high"], "the high end")
        if not low < high:
            raise SweepRefused(f"space: {name!r} needs low < high, got {low} and {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise SweepRefused(f"space: {name!r} log must be true or false, got {log!r}")
        if log and low <= 0:
            raise SweepRefused(f"space: {name!r} on a log scale needs low > 0, got {low}")
        out[name] = {"low": low, "high": high, "log": log}
    return out


def grid_size(space: dict[str, dict]) -> int:
    """Number of combinations of a values-only space (the product of its axes' lengths)."""
    return math.prod(len(s["values"]) for s in space.values())


def grid_points(space: dict[str, dict]) -> list[dict]:
    """Every combination of a values-only space, ``[{name: value}]`` in row-major order."""
    names = list(space)
    return [dict(zip(names, combo)) for combo in product(*(space[n]["values"] for n in names))]


def check_trials(*, search: str, space: dict[str, dict], n_trials: int | None) -> int:
    """The number of trials to run: for a grid, every point (``n_trials`` may ask for fewer);
    else ``n_trials`` (default 10). Raises SweepRefused outside 1..MAX_TRIALS or, for a grid,
    above its size."""
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool)):
        raise SweepRefused(f"n_trials: give a whole number 1 to {MAX_TRIALS}, got {n_trials!r}")
    if search == "grid":
        size = grid_size(space)
        if size > MAX_TRIALS:
            raise SweepRefused(f"space: the grid has {size} points; at most {MAX_TRIALS}")
        if n_trials is None:
            return size
        if n_trials > size:
            raise SweepRefused(f"n_trials: the grid has {size} points, so at most {size} trials; got {n_trials}")
    n = 10 if n_trials is None else n_trials
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_TRIALS:
        raise SweepRefused(f"n_trials: give 1 to {MAX_TRIALS}, got {n_trials!r}")
    return n


def distributions(space: dict[str, dict]) -> dict:
    """Optuna distributions for a normalised space: values -> ``CategoricalDistribution``,
    an integer range -> ``IntDistribution``, a float range -> ``FloatDistribution``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, s in space.items():
        if "values" in s:
            out[name] = CategoricalDistribution(s["values"])
        elif HYPERPARAMS[name].type is int:
            out[name] = IntDistribution(int(s["low"]), int(s["high"]), log=s["log"])
        else:
            out[name] = FloatDistribution(float(s["low"]), float(s["high"]), log=s["log"])
    return out


def make_sampler(*, search: str, space: dict[str, dict], seed: int, n_trials: int, trial_number: int = 0):
    """The Optuna sampler for ``search``, built afresh for each ask: samplers keep no state
    between asks that matters here (Optuna reads the trials from the storage). A grid's order is
    shuffled by ``seed`` and must stay the same for the whole sweep; random and TPE draw with
    ``seed + 7919 * trial_number`` so that a rebuilt sampler does not repeat its first draw.
    TPE samples at random for its first ``max(2, min(10, n_trials // 2))`` trials."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler whose ``after_trial`` does not call ``study.stop()`` once the grid is
        covered: that works only inside ``study.optimize``, and a sweep asks and tells from
        Celery tasks and counts its trials itself."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    if search == "grid":
        return AskTellGridSampler({n: list(s["values"]) for n, s in space.items()}, seed=seed)
    if search == "random":
        return optuna.samplers.RandomSampler(seed=(seed + 7919 * trial_number) % 2**31)
    if search == "tpe":
        return optuna.samplers.TPESampler(seed=(seed + 7919 * trial_number) % 2**31, n_startup_trials=max(2, min(10, n_trials // 2)))
    raise SweepRefused(f"search: {search!r} is not one of {', '.join(SEARCHES)}")


def trial_overrides(params: dict) -> dict:
    """A trial's sampled ``{name: value}`` converted back to each hyperparameter's type (Optuna
    gives a float for an integer choice stored as a categorical)."""
    return {n: convert_hyperparam(n, v) for n, v in params.items()}


# --- early stop -----------------------------------------------------------------------------


def divergence_series(evals: list[tuple[float | None, float | None]]) -> tuple[str, list[float]]:
    """From validation evaluations ``[(loss, fidelity)]`` in step order, the measure of
    student-teacher divergence: ``1 - fidelity`` (disagreement with the teacher's label or
    token) when every evaluation recorded a fidelity, else the validation loss (the KD loss, KL
    at temperature T mixed with cross-entropy, or cross-entropy to the teacher's answer).
    Returns (``"fidelity"`` or ``"loss"``, values); evaluations without the figure are skipped."""
    if evals and all(f is not None for _, f in evals):
        return "fidelity", [1.0 - float(f) for _, f in evals]
    return "loss", [float(l) for l, _ in evals if l is not None]


def divergence_grows(values: list[float], patience: int) -> bool:
    """True when the last ``patience`` evaluations each raised the divergence (strictly) over the
    one before: ``values[-k-1] < values[-k]`` for k = patience..1, so it needs ``patience + 1``
    values. ``patience`` 0 turns the rule off. This is the seed's convergence advice: stop a
    student whose divergence from the teacher keeps growing, whatever its own loss does."""
    if patience <= 0 or len(values) < patience + 1:
        return False
    tail = values[-(patience + 1):]
    return all(b > a for a, b in zip(tail, tail[1:]))


def prune_reason(evals: list[tuple[float | None, float | None]], patience: int) -> str:
    """``""``, or the trial's stop reason (starting with ``PRUNED_PREFIX``) when the divergence of
    ``evals`` (see ``divergence_series``) grew for ``patience`` consecutive evaluations."""
    kind, values = divergence_series(evals)
    if not divergence_grows(values, patience):
        return ""
    tail = values[-(patience + 1):]
    if kind == "fidelity":
        shown = " -> ".join(f"{1 - v:.3f}" for v in tail)
        return f"{PRUNED_PREFIX} validation fidelity fell for {patience} consecutive evaluations ({shown})"
    shown = " -> ".join(f"{v:.4f}" for v in tail)
    return f"{PRUNED_PREFIX} validation loss (student-teacher divergence) rose for {patience} consecutive evaluations ({shown})"
