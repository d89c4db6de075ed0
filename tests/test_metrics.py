"""Metric values on known inputs (hand-computed)."""
import math

import pytest

from workers.pipeline import metrics as M


@pytest.mark.parametrize("text", ["The card arrived today.", "我的银行卡今天到了。", "मेरा कार्ड आज आ गया।", "٣ بطاقات"])
def test_identical_texts_score_full_marks_in_any_script(text):
    assert M.rouge_l([text], [text]) == 1.0
    assert M.chrf([text], [text]) == pytest.approx(100.0)


def test_rouge_tokenizer_keeps_chinese_and_hindi():
    tok = M.ScriptTokenizer()
    assert tok.tokenize("我的卡") == ["我", "的", "卡"]
    assert tok.tokenize("मेरा कार्ड, आज!") == ["मेरा", "कार्ड", "आज"]
    # Different non-Latin texts are not "identical by emptiness": partial overlap scores between 0 and 1.
    r = M.rouge_l(["我的卡到了"], ["我的卡丢了"])
    assert 0.5 < r < 1.0
    assert M.rouge_l(["मेरा कार्ड"], ["आज बारिश"]) == 0.0


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e") = "a c d" (3); P = 3/4, R = 3/4, F = 0.75
    assert M.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)


def test_three_item_set_scores_three_items():
    preds = ["x", "y", "z"]
    assert M.text_metrics(preds, ["x", "y", "w"])["n"] == 3
    c = M.classification_metrics(["a", "b", None], ["a", "a", "b"], ["a", "b"])
    assert c["n"] == 3
    assert sum(map(sum, c["confusion"]["matrix"])) == 3
    e = M.extraction_metrics(['{"a": 1}', "not json", '{"a": 2}'], [{"a": 1}, {"a": 1}, {"a": 1}])
    assert e["n"] == 3 and e["scored"] == 3
    assert M.rouge_l(preds, ["x", "y", "w"]) == pytest.approx(2 / 3)


def test_classification_accuracy_macro_f1_confusion():
    refs = ["a", "a", "b", "b"]
    preds = ["a", "b", "b", "b"]
    m = M.classification_metrics(preds, refs, ["a", "b"])
    assert m["accuracy"] == 0.75
    # a: P=1, R=1/2 -> F1=2/3; b: P=2/3, R=1 -> F1=0.8; macro = (2/3 + 0.8)/2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion"] == {"labels": ["a", "b"], "matrix": [[1, 1], [0, 2]]}


def test_missing_label_counts_as_wrong_and_agreement():
    m = M.classification_metrics(["a", None], ["a", "b"], ["a", "b"])
    assert m["accuracy"] == 0.5
    assert m["confusion"]["labels"] == ["a", "b", M.NO_LABEL]
    assert M.agreement(["a", "b", "c"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    assert M.agreement(["a", "b"], ["a", None]) == 1.0


def test_kl_hand_computed():
    p = {"a": 0.5, "b": 0.5}
    q = {"a": 0.25, "b": 0.75}
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_divergence(p, q) == pytest.approx(expected)
    assert M.kl_divergence(p, p) == 0.0
    assert M.mean_kl([p, None, p], [q, q, p]) == pytest.approx(expected / 2)


def test_extraction_field_scores():
    preds = ['```json\n{"city": "Paris", "date": "monday"}\n```', '{"city": "Rome"}', "oops"]
    refs = ['{"city": "paris", "date": "Monday"}', '{"city": "Rome", "date": "Friday"}', '{"city": "Oslo"}']
    m = M.extraction_metrics(preds, refs)
    assert m["json_valid"] == pytest.approx(2 / 3)
    # tp: 2 + 1 = 3; fp: 0; fn: 0 + 1 + 1 = 2
    assert m["field_precision"] == 1.0
    assert m["field_recall"] == pytest.approx(3 / 5)
    assert m["field_f1"] == pytest.approx(2 * 0.6 / 1.6)
    assert m["exact_match"] == pytest.approx(1 / 3)


def test_pairwise_win_rate_counts_disagreement_as_tie():
    # A judge that always prefers the first answer (pure position bias): every pair is a tie.
    assert M.pairwise_win_rate(["q1", "q2"], ["s1", "s2"], ["t1", "t2"], lambda q, a, b: "A") == {
        "n": 2, "wins": 0, "losses": 0, "ties": 2, "win_rate": 0.5}
    # A judge that prefers the longer answer: student wins q1, loses q2, ties q3.
    judge = lambda q, a, b: "A" if len(a) > len(b) else ("B" if len(b) > len(a) else "tie")  # noqa: E731
    r = M.pairwise_win_rate(["q1", "q2", "q3"], ["long", "s", "same"], ["t", "longer", "sama"], judge)
    assert (r["wins"], r["losses"], r["ties"]) == (1, 1, 1) and r["win_rate"] == 0.5


def test_speed_and_cost():
    s = M.speed_figures([10, 20, 30, 40])
    assert s["latency_ms_p50"] == 25 and s["latency_ms_p95"] == pytest.approx(38.5)
    assert s["throughput_qps"] == pytest.approx(4 / 0.1)
    # 100 in + 10 out tokens at $1/$2 per 1M = $0.00012 per query -> $0.12 per 1K
    assert M.api_cost_per_1k([100, 100], [10, 10], price_in_per_1m=1, price_out_per_1m=2) == pytest.approx(0.12)
    # 360 ms per query at $0.10/h = 0.0001 h -> $0.00001 per query -> $0.01 per 1K
    assert M.compute_cost_per_1k([360, 360], price_per_hour_usd=0.10) == pytest.approx(0.01)
    assert M.retention(0.9, 1.0) == 0.9 and M.retention(0.5, 0) is None


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.classification_metrics(["a"], ["a", "b"])


def test_judge_reply_parsing_and_both_orders():
    from workers.pipeline.evaluation import judge_messages, make_judge, parse_judgement

    assert [parse_judgement(x) for x in ("A", " b.", "Answer A", "tie", "I think both", None)] == ["A", "B", "A", "tie", "tie", "tie"]
    msgs = judge_messages("q", "first", "second")
    assert "Answer A:\nfirst" in msgs[1]["content"] and "Answer B:\nsecond" in msgs[1]["content"]
    # A judge model that prefers whichever answer mentions "paris": the student wins in both orders.
    judge = make_judge(lambda m: "A" if "Answer A:\nparis" in m[1]["content"] else "B")
    assert M.pairwise_win_rate(["capital?"], ["paris"], ["lyon"], judge)["wins"] == 1
