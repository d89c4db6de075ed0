"""workers.pipeline.evaluation's scoring without Django: primary teacher, cost per 1K, verdict."""
import pytest

from workers.pipeline.evaluation import READY_RETENTION, rank_teachers, teacher_cost_per_1k, verdict
from workers.pipeline.metrics import retention


def test_rank_teachers_best_first_none_as_zero_ties_in_order():
    assert rank_teachers([0.5, None, 0.9, 0.9]) == [2, 3, 0, 1]
    assert rank_teachers([]) == []


def test_api_teacher_cost_uses_recorded_costs_else_token_prices():
    common = dict(api=True, input_tokens=[1000, 1000], output_tokens=[500, 500], price_in_per_1m=2.0,
                  price_out_per_1m=4.0, latencies_ms=[100.0, 100.0], price_per_hour_usd=3.6)
    cost, basis = teacher_cost_per_1k(recorded_costs_usd=[0.001, 0.003], **common)
    assert (cost, basis) == (pytest.approx(2.0), "api_prices")
    cost, basis = teacher_cost_per_1k(recorded_costs_usd=[0.0, 0.0], **common)
    # 1000 tokens in at $2/1M + 500 out at $4/1M = $0.004 per query -> $4 per 1K queries
    assert (cost, basis) == (pytest.approx(4.0), "api_prices")


def test_local_teacher_cost_is_compute_time_at_the_hourly_price():
    cost, basis = teacher_cost_per_1k(api=False, recorded_costs_usd=[], input_tokens=[], output_tokens=[],
                                      price_in_per_1m=0.0, price_out_per_1m=0.0, latencies_ms=[100.0, 300.0],
                                      price_per_hour_usd=3.6)
    # 0.2 s per query at $3.60/h = $0.0002 per query -> $0.20 per 1K queries
    assert cost == pytest.approx(0.2)
    assert basis == "compute time x $3.60/h"


def test_verdict_ready_not_ready_and_none():
    assert READY_RETENTION == 0.95
    text, ready = verdict(metric="accuracy", best_model="merged (run 3)", retention=retention(0.76, 0.8),
                          teacher_quality=0.8, best_quality=0.76)
    assert (text, ready) == ("ready to ship: merged (run 3) keeps 95.0 % of the teacher's accuracy", True)
    text, ready = verdict(metric="accuracy", best_model="s", retention=retention(0.5, 0.8), teacher_quality=0.8,
                          best_quality=0.5)
    assert ready is False
    assert text == "not ready: best student s keeps 62.5 % of the teacher's accuracy (gap 30.0 points; needs 95 %)"
    assert verdict(metric="rouge_l", best_model="s", retention=retention(0.5, 0.0), teacher_quality=0.0,
                   best_quality=0.5) == ("no verdict: the teacher's rouge_l is 0 or missing", None)


def test_model_layers_and_speedup(tmp_path):
    from workers.pipeline.evaluation import model_layers, speedup

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"num_hidden_layers": 3, "hidden_size": 576}')
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"n_layer": 12}')
    assert model_layers(tmp_path / "llama") == 3 and model_layers(tmp_path / "gpt2") == 12
    assert model_layers(tmp_path) is None and model_layers(tmp_path / "missing") is None
    assert speedup(400.0, 50.0) == 8.0 and speedup(None, 50.0) is None and speedup(400.0, 0.0) is None
