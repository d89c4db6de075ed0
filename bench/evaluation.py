"""Benchmark: how fast the evaluated models answer on this machine, and speculative decoding.

Measures, on BANKING77 test queries with the short student prompt, the per-query latency
(p50/p95 ms) and throughput (queries/s) of the SmolLM2-135M student in fp32 and with torch
dynamic INT8, of a MiniLM classifier, and SmolLM2 as the draft model of itself through
transformers assisted generation (speed-up and acceptance rate). The last line is one JSON object.

    python bench/evaluation.py [--quick]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer queries")
    args = ap.parse_args()
    n = 4 if args.quick else 40
    n_spec = 1 if args.quick else 6

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.pipeline import evaluation as P
    from workers.pipeline import metrics as M
    from workers.pipeline.local_lm import LocalCausalLM
    from workers.pipeline.registry import MINILM, SMOLLM2, resolve_model
    from workers.pipeline.specs import QueryItem, TaskSpec

    data = Path(os.environ.get("DISTILLHUB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    labels = ("card_arrival", "lost_or_stolen_card", "refund_not_showing_up")
    rows = []
    with open(data / "banking77" / "test.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["category"].lower() in labels:
                rows.append((r["text"], r["category"].lower()))
    rows = rows[::max(1, len(rows) // n)][:n]
    items = [QueryItem(i, t) for i, (t, _) in enumerate(rows)]
    refs = [l for _, l in rows]
    task = TaskSpec(task_type="classification", labels=labels)
    out: dict = {"queries": len(items), "threads": torch.get_num_threads()}

    fp32 = LocalCausalLM.load(SMOLLM2, kind="base", device="cpu")
    int8_model = torch.ao.quantization.quantize_dynamic(
        LocalCausalLM.load(SMOLLM2, kind="base", device="cpu").model, {torch.nn.Linear}, dtype=torch.qint8)
    int8 = LocalCausalLM(int8_model, AutoTokenizer.from_pretrained(resolve_model(SMOLLM2)), "int8", "cpu")
    for name, lm in (("fp32", fp32), ("int8", int8)):
        t0 = time.perf_counter()
        preds = P.predict_causal(lm, task, items)
        wall = time.perf_counter() - t0
        sp = M.speed_figures([p.latency_ms for p in preds])
        acc = M.classification_metrics([p.label for p in preds], refs, labels)["accuracy"]
        out[f"smollm2_{name}_latency_ms_p50"] = sp["latency_ms_p50"]
        out[f"smollm2_{name}_latency_ms_p95"] = sp["latency_ms_p95"]
        out[f"smollm2_{name}_qps"] = sp["throughput_qps"]
        out[f"smollm2_{name}_accuracy"] = acc
        print(f"SmolLM2 {name}: p50 {sp['latency_ms_p50']:.0f} ms, p95 {sp['latency_ms_p95']:.0f} ms, "
              f"{sp['throughput_qps']:.2f} queries/s (generation only; wall with soft labels {wall:.1f} s), accuracy {acc:.2f}")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        src = resolve_model(MINILM)
        m = AutoModelForSequenceClassification.from_pretrained(src, num_labels=3, id2label=dict(enumerate(labels)))
        m.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        preds = P.predict_classifier(tmp, items, labels=labels)
    sp = M.speed_figures([p.latency_ms for p in preds])
    out["minilm_latency_ms_p50"] = sp["latency_ms_p50"]
    out["minilm_qps"] = sp["throughput_qps"]
    print(f"MiniLM classifier (random head): p50 {sp['latency_ms_p50']:.1f} ms, {sp['throughput_qps']:.1f} queries/s")

    from workers.pipeline import prompts

    msgs = [prompts.teacher_messages(TaskSpec(task_type="summarization"), "Summarize: " + t) for t, _ in rows[:n_spec]]
    spec = P.speculative_decoding(fp32, int8, msgs, max_new_tokens=48)
    out["spec_speedup"] = spec["speedup"]
    out["spec_acceptance_rate"] = spec["acceptance_rate"]
    print(f"Speculative decoding, SmolLM2 fp32 teacher with its INT8 copy as draft: speed-up {spec['speedup']:.2f}x, "
          f"acceptance {spec['acceptance_rate'] * 100:.0f} % of {spec['tokens']} tokens")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
