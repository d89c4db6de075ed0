"""workers.pipeline.sweeps: the search space checked against the hyperparameters' ranges, Optuna
distributions and samplers, and the early-stop rule on metric sequences."""
import optuna
import pytest

from workers.pipeline.sweeps import (PRUNED_PREFIX, SweepRefused, check_trials, distributions, divergence_grows,
                                     divergence_series, grid_points, grid_size, make_sampler, parse_param_text,
                                     parse_space, prune_reason, trial_overrides)


def test_param_text_values_and_ranges():
    assert parse_param_text("learning_rate=1e-4, 3e-4") == ("learning_rate", {"values": ["1e-4", "3e-4"]})
    assert parse_param_text("learning_rate=1e-5:1e-3:log") == (
        "learning_rate", {"low": "1e-5", "high": "1e-3", "log": True})
    assert parse_param_text("alpha=0.1:0.9") == ("alpha", {"low": "0.1", "high": "0.9", "log": False})
    for bad in ("learning_rate", "=1,2", "alpha=0.1:0.5:cubic", "alpha="):
        with pytest.raises(SweepRefused, match="param"):
            parse_param_text(bad)


def test_space_is_converted_and_checked_against_the_hyperparameter_ranges():
    space = parse_space(method="classifier-kd", search="grid",
                        space={"learning_rate": {"values": ["1e-4", "3e-4", "1e-4"]},
                               "per_device_train_batch_size": {"values": ["8", 16.0]}})
    assert space == {"learning_rate": {"values": [1e-4, 3e-4]}, "per_device_train_batch_size": {"values": [8, 16]}}
    assert grid_size(space) == 4
    assert grid_points(space)[1] == {"learning_rate": 1e-4, "per_device_train_batch_size": 16}
    rng = parse_space(method="classifier-kd", search="tpe",
                      space={"temperature": {"low": 1, "high": "8"}, "alpha": {"values": [0.3, 0.7]}})
    assert rng == {"temperature": {"low": 1.0, "high": 8.0, "log": False}, "alpha": {"values": [0.3, 0.7]}}
    cases = [
        ({"alpha": {"values": [0.5, 1.5]}}, "grid", "'alpha' must be in \\[0, 1\\], got 1.5"),
        ({"temperature": {"values": [0]}}, "grid", "'temperature' must be in \\[0.01, 100\\]"),
        ({"learning_rate": {"low": 1e-5, "high": 1e-3}}, "grid", "'learning_rate' is a range; a grid search"),
        ({"learning_rate": {"low": 1e-3, "high": 1e-5}}, "random", "'learning_rate' needs low < high"),
        ({"warmup_ratio": {"low": 0, "high": 0.5, "log": True}}, "tpe", "'warmup_ratio' on a log scale"),
        ({"lora_r": {"values": [8]}}, "grid", "'lora_r' is not a setting of classifier-kd"),
        ({"target_modules": {"values": ["q_proj"]}}, "grid", "not a setting of classifier-kd"),
        ({"activation_checkpointing": {"values": [True]}}, "grid", "'activation_checkpointing' cannot be swept"),
        ({"lr": {"values": [1]}}, "grid", "'lr' is not a hyperparameter"),
        ({}, "grid", "at least one hyperparameter"),
        ({"alpha": {"values": [0.5]}}, "bayes", "search: 'bayes'"),
        ({"lr_scheduler_type": {"low": 1, "high": 2}}, "random", "takes a list of values"),
    ]
    for sp, search, msg in cases:
        with pytest.raises(SweepRefused, match=msg):
            parse_space(method="classifier-kd", search=search, space=sp)
    assert parse_space(method="sft-lora", search="random", space={"lora_r": {"low": 4, "high": 64, "log": True}}) == {
        "lora_r": {"low": 4, "high": 64, "log": True}}


def test_trial_count():
    grid = {"alpha": {"values": [0.3, 0.7]}, "temperature": {"values": [2.0, 4.0]}}
    assert check_trials(search="grid", space=grid, n_trials=None) == 4
    assert check_trials(search="grid", space=grid, n_trials=3) == 3
    with pytest.raises(SweepRefused, match="the grid has 4 points"):
        check_trials(search="grid", space=grid, n_trials=5)
    assert check_trials(search="tpe", space=grid, n_trials=None) == 10
    for bad in (0, 201, 2.5):
        with pytest.raises(SweepRefused, match="n_trials"):
            check_trials(search="random", space=grid, n_trials=bad)


def test_samplers_draw_inside_the_space():
    space = parse_space(method="sft-lora", search="random",
                        space={"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
                               "lora_r": {"low": 4, "high": 32}, "lr_scheduler_type": {"values": ["linear", "cosine"]}})
    d = distributions(space)
    assert isinstance(d["lora_r"], optuna.distributions.IntDistribution) and d["learning_rate"].log
    for search in ("random", "tpe"):
        study = optuna.create_study(direction="minimize")
        for i in range(4):
            study.sampler = make_sampler(search=search, space=space, seed=3, n_trials=6, trial_number=i)
            t = study.ask(d)
            p = trial_overrides(t.params)
            assert 1e-5 <= p["learning_rate"] <= 1e-3 and 4 <= p["lora_r"] <= 32 and isinstance(p["lora_r"], int)
            assert p["lr_scheduler_type"] in ("linear", "cosine")
            study.tell(t, p["learning_rate"] * 1000)
    grid = parse_space(method="classifier-kd", search="grid", space={"alpha": {"values": [0.3, 0.7]},
                                                                       "temperature": {"values": [2, 4]}})
    study = optuna.create_study(direction="minimize")
    seen = set()
    for i in range(4):
        study.sampler = make_sampler(search="grid", space=grid, seed=3, n_trials=4, trial_number=i)
        t = study.ask(distributions(grid))
        seen.add((t.params["alpha"], t.params["temperature"]))
        study.tell(t, 1.0)
    assert seen == {(0.3, 2.0), (0.3, 4.0), (0.7, 2.0), (0.7, 4.0)}  # each grid point exactly once


def test_divergence_grows_rule_on_metric_sequences():
    assert divergence_grows([0.5, 0.4, 0.45, 0.5], 2)  # two rises in a row
    assert not divergence_grows([0.5, 0.4, 0.45, 0.45], 2)  # a tie breaks the run
    assert not divergence_grows([0.5, 0.6, 0.4, 0.5], 2)  # rises, but not consecutive
    assert not divergence_grows([0.4, 0.5], 2)  # needs patience + 1 values
    assert divergence_grows([0.4, 0.5], 1)
    assert not divergence_grows([0.1, 0.2, 0.3, 0.4], 0)  # 0 turns it off
    # Fidelity where every evaluation has one: divergence = 1 - fidelity.
    kind, values = divergence_series([(1.2, 0.6), (1.1, 0.7), (1.15, 0.65), (1.3, 0.5)])
    assert kind == "fidelity" and values == pytest.approx([0.4, 0.3, 0.35, 0.5])
    assert divergence_series([(1.2, None), (1.3, 0.5)]) == ("loss", [1.2, 1.3])
    # The validation loss falls while the fidelity falls too: fidelity decides.
    reason = prune_reason([(1.0, 0.8), (0.9, 0.75), (0.8, 0.7)], 2)
    assert reason.startswith(PRUNED_PREFIX) and "fidelity fell for 2 consecutive evaluations" in reason
    assert "0.800 -> 0.750 -> 0.700" in reason
    assert prune_reason([(1.0, 0.8), (0.9, 0.75), (0.8, 0.76)], 2) == ""
    reason = prune_reason([(0.5, None), (0.6, None), (0.7, None)], 2)
    assert "validation loss (student-teacher divergence) rose for 2" in reason and "0.5000 -> 0.6000 -> 0.7000" in reason


def test_a_range_log_flag_must_be_a_bool():
    """``"log": "false"`` was read as true (``bool("false")``): a range silently on a log scale."""
    assert parse_space(method="sft-lora", search="random", space={"learning_rate": {
        "low": 1e-5, "high": 1e-3, "log": False}})["learning_rate"]["log"] is False
    for bad in ("false", 1, None):
        with pytest.raises(SweepRefused, match=rf"^space: 'learning_rate' log must be true or false, got {bad!r}"):
            parse_space(method="sft-lora", search="random",
                        space={"learning_rate": {"low": 1e-5, "high": 1e-3, "log": bad}})
