"""Evaluation metrics: plain Python on lists of answers, no Django.

Every function takes parallel lists (one item per query) and returns plain floats or dicts, so
a three-item set scores exactly three items. Libraries do the arithmetic where one exists:
scikit-learn (accuracy, macro-F1, confusion matrix), scipy (KL divergence), rouge-score
(ROUGE-L, with a tokenizer that keeps every script) and sacrebleu (chrF).

Scales: accuracy, F1, agreement, ROUGE-L, JSON validity, exact match and win rate are fractions
in [0, 1]; chrF is on sacrebleu's 0-100 scale; KL is in nats.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import unicodedata
from collections.abc import Callable, Sequence

NO_LABEL = "(no label)"

# Scripts written without spaces between words: each character is its own token.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u0e00-\u0e7f"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


class ScriptTokenizer:
    """A rouge-score tokenizer that keeps any script: case-folded (NFKC) words split on
    whitespace with punctuation and symbols stripped, and one token per character for scripts
    written without spaces (Chinese, Japanese, Korean, Thai). rouge-score's default tokenizer
    keeps only ``[a-z0-9]`` and so scores Chinese or Hindi text as empty."""

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text or "").casefold()
        out = []
        for tok in _TOKEN_RE.findall(text):
            tok = "".join(ch for ch in tok if unicodedata.category(ch)[0] not in ("P", "S"))
            if tok:
                out.append(tok)
        return out


def _check_lengths(**lists: Sequence) -> int:
    sizes = {k: len(v) for k, v in lists.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"lists differ in length: {sizes}")
    return next(iter(sizes.values()), 0)


# --- classification ---------------------------------------------------------------------------


def _labels_or_none(xs: Sequence[str | None]) -> list[str]:
    return [x if x is not None else NO_LABEL for x in xs]


def classification_metrics(predictions: Sequence[str | None], references: Sequence[str | None],
                           labels: Sequence[str] = ()) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of predicted labels against references.

    ``predictions``/``references``: one label (or None: no label found) per query. Queries whose
    reference is None are left out. Macro-F1 averages per-label F1 over the union of labels in
    the references and predictions (scikit-learn's default), counting ``(no label)`` answers as
    a wrong label. Returns ``{"n", "accuracy", "macro_f1", "confusion": {"labels": [...],
    "matrix": [[count]]}}`` where ``matrix[i][j]`` counts reference ``labels[i]`` predicted as
    ``labels[j]``. Raises ValueError when the lists differ in length."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    _check_lengths(predictions=predictions, references=references)
    pairs = [(p, r) for p, r in zip(predictions, references) if r is not None]
    if not pairs:
        return {"n": 0, "accuracy": None, "macro_f1": None, "confusion": {"labels": [], "matrix": []}}
    y_pred = _labels_or_none([p for p, _ in pairs])
    y_true = [r for _, r in pairs]
    present = set(y_true) | set(y_pred)
    order = [l for l in labels if l in present] + sorted(present - set(labels) - {NO_LABEL})
    if NO_LABEL in present:
        order.append(NO_LABEL)
    f1_labels = sorted(set(y_true) | set(y_pred))
    return {
        "n": len(pairs),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=f1_labels, average="macro", zero_division=0)),
        "confusion": {"labels": order, "matrix": confusion_matrix(y_true, y_pred, labels=order).tolist()},
    }


def agreement(student: Sequence, teacher: Sequence) -> float | None:
    """Fraction of queries where the student's answer equals the teacher's (fidelity); pairs
    where the teacher gave nothing are left out. None when no pair is left."""
    _check_lengths(student=student, teacher=teacher)
    pairs = [(s, t) for s, t in zip(student, teacher) if t is not None]
    if not pairs:
        return None
    return sum(1 for s, t in pairs if s == t) / len(pairs)


def kl_divergence(p: dict[str, float], q: dict[str, float], *, eps: float = 1e-9) -> float:
    """KL(p || q) = sum_l p(l) * ln(p(l) / q(l)) in nats over the labels of ``p`` (Kullback and
    Leibler 1951), computed with ``scipy.special.rel_entr``. Probabilities of ``q`` are clipped
    to ``eps`` so a label the student gives zero probability costs a large but finite amount;
    both are renormalised over ``p``'s labels first."""
    from scipy.special import rel_entr

    labels = sorted(p)
    pv = [max(float(p[l]), 0.0) for l in labels]
    qv = [max(float(q.get(l, 0.0)), eps) for l in labels]
    zp, zq = sum(pv), sum(qv)
    if zp <= 0:
        raise ValueError("p has no probability mass")
    return float(sum(rel_entr([x / zp for x in pv], [y / zq for y in qv])))


def mean_kl(teacher_probs: Sequence[dict | None], student_probs: Sequence[dict | None]) -> float | None:
    """Mean KL(teacher || student) in nats over the queries where both give probabilities;
    None when there is no such query."""
    _check_lengths(teacher=teacher_probs, student=student_probs)
    vals = [kl_divergence(t, s) for t, s in zip(teacher_probs, student_probs) if t and s]
    return sum(vals) / len(vals) if vals else None


# --- extraction -------------------------------------------------------------------------------


def parse_json_answer(text: str | None):
    """The JSON object in an answer (a bare object, or one inside a ``` fence), or None."""
    if text is None:
        return None
    s = text.strip()
    m = re.search(r"```(?:json)?\s*(.*?)```", s, flags=re.S)
    if m:
        s = m.group(1).strip()
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, ValueError):
        start, end = s.find("{"), s.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            obj = json.loads(s[start:end + 1])
        except (json.JSONDecodeError, ValueError):
            return None
    return obj if isinstance(obj, dict) else None


def _flatten(obj, prefix: str = "") -> set[tuple[str, str]]:
    """(field path, canonical JSON value) pairs of the leaves; list items are a set per path."""
    out: set[tuple[str, str]] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for v in obj:
            out |= _flatten(v, prefix + "[]")
    else:
        if isinstance(obj, str):
            obj = unicodedata.normalize("NFKC", obj).strip().casefold()
        out.add((prefix, json.dumps(obj, ensure_ascii=False, sort_keys=True)))
    return out


def extraction_metrics(predictions: Sequence[str | None], references: Sequence[str | dict | None]) -> dict:
    """JSON validity rate, field-level precision/recall/F1 (micro-averaged over (field path,
    value) leaves; strings compared case-folded) and exact match (the whole object equal).

    ``predictions``: raw answers. ``references``: JSON text or dicts; queries whose reference is
    None (or not a JSON object) count for validity only. Returns ``{"n", "json_valid",
    "field_precision", "field_recall", "field_f1", "exact_match"}``."""
    _check_lengths(predictions=predictions, references=references)
    n = len(predictions)
    parsed = [parse_json_answer(p) for p in predictions]
    tp = fp = fn = exact = scored = 0
    for obj, ref in zip(parsed, references):
        ref_obj = ref if isinstance(ref, dict) else parse_json_answer(ref)
        if ref_obj is None:
            continue
        scored += 1
        pred_f = _flatten(obj) if obj is not None else set()
        ref_f = _flatten(ref_obj)
        tp += len(pred_f & ref_f)
        fp += len(pred_f - ref_f)
        fn += len(ref_f - pred_f)
        exact += int(obj is not None and pred_f == ref_f)
    precision = tp / (tp + fp) if tp + fp else (0.0 if scored else None)
    recall = tp / (tp + fn) if tp + fn else (0.0 if scored else None)
    f1 = (2 * precision * recall / (precision + recall) if precision and recall else 0.0) if scored else None
    return {"n": n, "json_valid": (sum(o is not None for o in parsed) / n) if n else None,
            "field_precision": precision, "field_recall": recall, "field_f1": f1,
            "exact_match": exact / scored if scored else None, "scored": scored}


# --- summarization and generation -------------------------------------------------------------


def rouge_l(predictions: Sequence[str | None], references: Sequence[str | None]) -> float | None:
    """Mean ROUGE-L F-measure (Lin 2004, via rouge-score) in [0, 1] over queries with a
    reference, tokenised by ScriptTokenizer so any script counts; identical texts score 1.0."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions=predictions, references=references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=ScriptTokenizer())
    vals = []
    for p, r in zip(predictions, references):
        if r is None:
            continue
        p = p or ""
        if p == r:  # identical (also when both have no tokens, e.g. only punctuation)
            vals.append(1.0)
            continue
        vals.append(scorer.score(r, p)["rougeL"].fmeasure)
    return sum(vals) / len(vals) if vals else None


def chrf(predictions: Sequence[str | None], references: Sequence[str | None]) -> float | None:
    """Corpus chrF (Popović 2015, via sacrebleu) on the 0-100 scale over queries with a
    reference: character n-grams, so it works in any script; identical texts score 100."""
    from sacrebleu.metrics import CHRF

    _check_lengths(predictions=predictions, references=references)
    pairs = [(p or "", r) for p, r in zip(predictions, references) if r is not None]
    if not pairs:
        return None
    if all(p == r for p, r in pairs):
        return 100.0  # sacrebleu scores identical all-whitespace texts 0
    return float(CHRF().corpus_score([p for p, _ in pairs], [[r for _, r in pairs]]).score)


def text_metrics(predictions: Sequence[str | None], references: Sequence[str | None]) -> dict:
    """``{"n", "rouge_l", "chrf"}`` for summarization and generation."""
    return {"n": sum(r is not None for r in references), "rouge_l": rouge_l(predictions, references),
            "chrf": chrf(predictions, references)}


def pairwise_win_rate(queries: Sequence[str], student: Sequence[str], teacher: Sequence[str],
                      judge: Callable[[str, str, str], str]) -> dict:
    """LLM-judge pairwise comparison of the student against the teacher.

    ``judge(query, answer_a, answer_b)`` returns ``"A"``, ``"B"`` or ``"tie"``. Each pair is
    judged in both orders (student first, then teacher first) to cancel position bias; the
    student wins only when both orders prefer it, loses only when both prefer the teacher, and
    any disagreement counts as a tie. Returns ``{"n", "wins", "losses", "ties", "win_rate"}``
    where ``win_rate = (wins + ties / 2) / n``."""
    _check_lengths(queries=queries, student=student, teacher=teacher)
    wins = losses = ties = 0
    for q, s, t in zip(queries, student, teacher):
        first = judge(q, s, t)   # student is A
        second = judge(q, t, s)  # student is B
        s_first = {"A": "student", "B": "teacher"}.get(first, "tie")
        s_second = {"A": "teacher", "B": "student"}.get(second, "tie")
        if s_first == s_second == "student":
            wins += 1
        elif s_first == s_second == "teacher":
            losses += 1
        else:
            ties += 1
    n = len(queries)
    return {"n": n, "wins": wins, "losses": losses, "ties": ties, "win_rate": (wins + ties / 2) / n if n else None}


# --- speed and cost ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default method); None for an empty list."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def speed_figures(latencies_ms: Sequence[float], wall_s: float | None = None) -> dict:
    """Latency p50/p95 (ms) per query and throughput (queries/s). Throughput is the query count
    over ``wall_s`` when given, else over the summed latencies (one query at a time)."""
    vals = [float(v) for v in latencies_ms if v is not None]
    total_s = wall_s if wall_s else sum(vals) / 1000.0
    return {"latency_ms_p50": percentile(vals, 50), "latency_ms_p95": percentile(vals, 95),
            "latency_ms_mean": statistics.fmean(vals) if vals else None,
            "throughput_qps": (len(vals) / total_s) if vals and total_s > 0 else None}


def api_cost_per_1k(input_tokens: Sequence[int], output_tokens: Sequence[int], *,
                    price_in_per_1m: float, price_out_per_1m: float) -> float | None:
    """USD per 1,000 queries at API prices: mean over queries of
    ``(input_tokens * price_in + output_tokens * price_out) / 1e6``, times 1,000."""
    _check_lengths(input_tokens=input_tokens, output_tokens=output_tokens)
    n = len(input_tokens)
    if not n:
        return None
    total = sum(i * price_in_per_1m + o * price_out_per_1m for i, o in zip(input_tokens, output_tokens)) / 1e6
    return total / n * 1000.0


def compute_cost_per_1k(latencies_ms: Sequence[float], *, price_per_hour_usd: float) -> float | None:
    """USD per 1,000 queries for a local model: mean compute time per query (hours) times the
    hourly price of the machine, times 1,000."""
    vals = [float(v) for v in latencies_ms if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals) / 3_600_000.0 * price_per_hour_usd * 1000.0


def headline_metric(task_type: str) -> str:
    """The metric that is a task's ``quality``: accuracy (classification), field F1
    (extraction), ROUGE-L (summarization and generation)."""
    return {"classification": "accuracy", "extraction": "field_f1"}.get(task_type, "rouge_l")


def retention(student_quality: float | None, teacher_quality: float | None) -> float | None:
    """Quality retention = student quality / teacher quality; None when either is missing or
    the teacher scores 0."""
    if student_quality is None or not teacher_quality:
        return None
    return student_quality / teacher_quality
