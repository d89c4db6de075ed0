"""Run models over evaluation queries and measure speculative decoding; no Django.

A causal student (base, merged, adapter, int8; see local_lm) is prompted with the short student
prompt one query at a time, so each query's latency is its own wall time. A classifier student
is a Hugging Face ``AutoModelForSequenceClassification`` folder with ``id2label`` and its
tokenizer. Both return one ``Prediction`` per query, in order.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.pipeline import prompts
from workers.pipeline.specs import QueryItem, TaskSpec

Report = Callable[[int, int], None]


@dataclass
class Prediction:
    """One model's answer to one query: raw ``output`` text, ``label`` (classification, None
    when no label matched), ``probs`` ``{label: probability}`` where the model gives them,
    ``latency_ms`` its wall time in milliseconds, tokens in and out (0 for classifiers)."""

    query_id: int
    output: str
    label: str | None = None
    probs: dict | None = None
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


def max_new_tokens_for(task: TaskSpec, tokenizer=None, default: int = 128) -> int:
    """Generation budget: two tokens past the longest label for classification (labels are
    short; a longer answer is wrong anyway), ``default`` otherwise."""
    if task.task_type == "classification" and task.labels and tokenizer is not None:
        longest = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in task.labels)
        return longest + 2
    return default


def predict_causal(lm, task: TaskSpec, items: Sequence[QueryItem], *, max_new_tokens: int | None = None,
                   report: Report | None = None, check_cancel: Callable[[], None] | None = None) -> list[Prediction]:
    """Answer every query greedily with ``lm`` (a LocalCausalLM) and the student prompt.

    Classification: the label is read with ``prompts.match_label`` and the soft labels come from
    ``lm.score_labels`` (not counted in the latency). ``report(done, total)`` is called after
    each query; ``check_cancel()`` before each one."""
    budget = max_new_tokens or max_new_tokens_for(task, lm.tokenizer)
    out: list[Prediction] = []
    for i, item in enumerate(items):
        if check_cancel:
            check_cancel()
        msgs = prompts.student_messages(task, item.text)
        g = lm.generate(msgs, max_new_tokens=budget, temperature=0.0)
        pred = Prediction(query_id=item.query_id, output=g.text, latency_ms=g.latency_ms,
                          input_tokens=g.input_tokens, output_tokens=g.output_tokens)
        if task.task_type == "classification" and task.labels:
            pred.label = prompts.match_label(g.text, task.labels)
            pred.probs = lm.score_labels(msgs, list(task.labels))
        out.append(pred)
        if report:
            report(i + 1, len(items))
    return out


class SequenceClassifier:
    """A classifier student folder: tokenizer + ``AutoModelForSequenceClassification`` whose
    config carries ``id2label``. Raises FileNotFoundError when ``config.json`` is missing."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path}/config.json is missing: not a classifier folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path))
        self.model.eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}

    def predict(self, text: str) -> tuple[str, dict]:
        """(label, {label: probability}) for one text."""
        import torch

        enc = self.tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(self.model(**enc).logits[0].float(), dim=-1).tolist()
        dist = {self.id2label[i]: p for i, p in enumerate(probs)}
        return max(dist, key=dist.get), dist


def predict_classifier(path: str | Path, items: Sequence[QueryItem], *, labels: Sequence[str] = (),
                       report: Report | None = None,
                       check_cancel: Callable[[], None] | None = None) -> list[Prediction]:
    """Answer every query with a classifier student folder, one query at a time. When
    ``labels`` is given, the probabilities are restricted to them (the project's label set)."""
    clf = SequenceClassifier(path)
    out = []
    for i, item in enumerate(items):
        if check_cancel:
            check_cancel()
        t0 = time.perf_counter()
        label, dist = clf.predict(item.text)
        ms = (time.perf_counter() - t0) * 1000.0
        if labels:
            dist = {l: dist.get(l, 0.0) for l in labels}
        out.append(Prediction(query_id=item.query_id, output=label, label=label, probs=dist, latency_ms=ms))
        if report:
            report(i + 1, len(items))
    return out


def shares_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token to the same id (a draft model must use the
    target model's vocabulary)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def speculative_decoding(teacher, student, prompts_messages: Sequence[list[dict]], *,
                         max_new_tokens: int = 32) -> dict:
    """Measure ``student`` as the draft model of ``teacher`` (both LocalCausalLM sharing a
    tokenizer) with transformers assisted generation (``generate(..., assistant_model=...)``).

    For each prompt: the teacher's plain greedy decoding time, then its assisted decoding time.
    ``speedup`` = total plain time / total assisted time. ``acceptance_rate`` is the fraction of
    the teacher's greedy tokens that the student's greedy draft predicts exactly when fed the same
    prefix (teacher forcing): with greedy verification that is the share of draft tokens the
    teacher accepts (Leviathan et al. 2023). Returns ``{"prompts", "tokens", "plain_s",
    "assisted_s", "speedup", "acceptance_rate", "same_output"}``. Raises ValueError when the
    tokenizers differ."""
    import torch

    if not shares_tokenizer(teacher.tokenizer, student.tokenizer):
        raise ValueError("the student does not share the teacher's tokenizer; it cannot be its draft model")
    eos = teacher._eos_ids()
    pad = teacher.tokenizer.pad_token_id
    plain_s = assisted_s = 0.0
    accepted = total = same = 0
    gen = dict(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
               eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode():
        for msgs in prompts_messages:
            ids = torch.tensor([teacher._encode(teacher.chat_text(msgs))], device=teacher.device)
            t0 = time.perf_counter()
            plain = teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
            plain_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            assisted = teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              assistant_model=student.model, **gen)
            assisted_s += time.perf_counter() - t0
            new = plain[0, ids.shape[1]:]
            same += int(torch.equal(plain[0], assisted[0].to(plain.device)))
            if len(new) == 0:
                continue
            full = plain.to(student.device)
            logits = student.model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0]
            draft = logits[ids.shape[1] - 1: full.shape[1] - 1].argmax(-1).to(new.device)
            accepted += int((draft == new).sum())
            total += len(new)
    return {"prompts": len(prompts_messages), "tokens": total, "plain_s": plain_s, "assisted_s": assisted_s,
            "speedup": plain_s / assisted_s if assisted_s > 0 else None,
            "acceptance_rate": accepted / total if total else None, "same_output": same}


def folder_size(path: str | Path) -> int:
    """Bytes on disk of a file or of every file under a folder (following no links twice)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def model_layers(path: str | Path) -> int | None:
    """Transformer layers of the model folder ``path``: ``num_hidden_layers`` (or ``n_layer`` /
    ``num_layers``) of its ``config.json``; None when the folder has no readable config (an
    ``int8`` folder, a hub id)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def speedup(teacher_ms: float | None, student_ms: float | None) -> float | None:
    """Speed-up of a student over the teacher: ``teacher_ms / student_ms`` (p50 latencies, ms);
    None when either is missing or the student's is 0."""
    if not teacher_ms or not student_ms:
        return None
    return teacher_ms / student_ms


JUDGE_SYSTEM = ("You compare two answers to the same request. Reply with exactly one of: A (answer A is better), "
                "B (answer B is better), tie (equally good).")


def judge_messages(query: str, answer_a: str, answer_b: str, instructions: str = "") -> list[dict]:
    """Chat messages asking a judge model which of two answers to ``query`` is better."""
    task = f"Task instructions:\n{instructions.strip()}\n\n" if instructions.strip() else ""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"{task}Request:\n{query}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
                                        "Which is better? Reply A, B or tie."}]


def parse_judgement(text: str | None) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's reply (anything unclear is a tie)."""
    import re

    m = re.match(r"\s*(?:answer\s*)?([AB])\b", text or "", flags=re.I)
    return m.group(1).upper() if m else "tie"


def make_judge(chat: Callable[[list[dict]], str], instructions: str = "") -> Callable[[str, str, str], str]:
    """A ``judge(query, a, b)`` for ``metrics.pairwise_win_rate`` from ``chat(messages) -> reply``
    (any model: an API teacher or a local one)."""
    return lambda q, a, b: parse_judgement(chat(judge_messages(q, a, b, instructions)))


# --- Scoring: primary teacher, cost per 1K queries, verdict -----------------------------------

#: The best student is ready to ship when it keeps at least this share of the teacher's quality.
READY_RETENTION = 0.95


def rank_teachers(qualities: Sequence[float | None]) -> list[int]:
    """Indices into ``qualities`` (each teacher's headline metric; None counts as 0.0), best
    first, ties in input order. The first is the primary teacher: its answers are the reference
    when the queries have no gold, and its quality is the one retention is measured against."""
    return sorted(range(len(qualities)), key=lambda i: -(qualities[i] or 0.0))


def teacher_cost_per_1k(*, api: bool, recorded_costs_usd: Sequence[float], input_tokens: Sequence[int],
                        output_tokens: Sequence[int], price_in_per_1m: float, price_out_per_1m: float,
                        latencies_ms: Sequence[float], price_per_hour_usd: float) -> tuple[float | None, str]:
    """A teacher's cost per 1,000 queries in USD and its basis. An API teacher (``api``): the
    mean recorded cost per answer x 1,000 when any answer recorded a cost, else the token counts
    at ``price_in_per_1m`` / ``price_out_per_1m`` USD per 1M tokens (basis ``"api_prices"``). A
    local teacher: the mean compute time per query (``latencies_ms``) at ``price_per_hour_usd``
    (basis ``"compute time x $P/h"``)."""
    from workers.pipeline import metrics as M

    if api:
        if any(recorded_costs_usd):
            cost = sum(recorded_costs_usd) / len(recorded_costs_usd) * 1000.0
        else:
            cost = M.api_cost_per_1k(input_tokens, output_tokens, price_in_per_1m=price_in_per_1m,
                                     price_out_per_1m=price_out_per_1m)
        return cost, "api_prices"
    return (M.compute_cost_per_1k(latencies_ms, price_per_hour_usd=price_per_hour_usd),
            f"compute time x ${price_per_hour_usd:.2f}/h")


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f} %"


def verdict(*, metric: str, best_model: str, retention: float | None, teacher_quality: float | None,
            best_quality: float | None) -> tuple[str, bool | None]:
    """The verdict text and ready-to-ship flag for the best student: ready when its
    ``retention`` (student / teacher quality, ``workers.pipeline.metrics.retention``) is at least
    ``READY_RETENTION``; no verdict (None) when the retention is unknown (teacher's metric 0 or
    missing)."""
    if retention is None:
        return f"no verdict: the teacher's {metric} is 0 or missing", None
    if retention >= READY_RETENTION:
        return f"ready to ship: {best_model} keeps {_fmt_pct(retention)} of the teacher's {metric}", True
    gap = (teacher_quality or 0) - (best_quality or 0)
    return (f"not ready: best student {best_model} keeps {_fmt_pct(retention)} of the teacher's {metric} "
            f"(gap {gap * 100:.1f} points; needs 95 %)"), False
