"""Benchmark: student-size presets (light / medium / heavy) on BANKING77: quality retention and
speed-up of each distilled student against its teacher, next to the seed's targets.

Teacher: the bundled SmolLM2-135M-Instruct (30 layers), local, answering by label scoring as the
demo's local teacher does (``LocalCausalLM.score_labels`` on the teacher prompt: system
instructions listing the labels, then the query). Its labels on the training queries are the
curated dataset. Each student is built by DistillHub's own path
(``workers.pipeline.training.train`` with ``method="logit-kd"`` and ``student_size``): the teacher
cut to evenly spaced layers (``workers.pipeline.student_init``, DistilBERT-style), then fully
fine-tuned on the teacher's token distributions mixed with cross-entropy on its labels.

Measured on a held-out slice of BANKING77's test split (gold labels):

- quality: accuracy against the gold label; the teacher's and each student's;
- retention: student accuracy / teacher accuracy (as the evaluation page computes it);
- fidelity: share of queries where the student picks the teacher's label;
- speed-up: the teacher's median label-scoring latency / the student's (one query at a time,
  the same CPU threads for both, after a warm-up), and the parameter and file-size ratios. The
  teacher answers its own prompt (instructions and the label list) and the student the short
  ``Label: {query}``, as in the product; ``speedup_same_prompt_<preset>`` times the teacher on
  the student's prompt too, which isolates what the layer cut alone buys.

    python bench/size_presets.py [--quick] [--labels N] [--train-per-label N] [--test-per-label N]
                                 [--epochs X] [--learning-rate LR]

``--quick``: 4 labels, 8 training and 4 held-out queries per label, 2 epochs (a few minutes on
two cores). Last line: one JSON object with ``retention_<preset>``, ``speedup_<preset>``,
``speedup_same_prompt_<preset>``, ``fidelity_<preset>``, ``layers_<preset>``,
``size_ratio_<preset>`` for each preset, and
``teacher_accuracy``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))
#: The seed's table: (retention range, speed-up range) per preset.
SEED_TARGETS = {"light": ((0.70, 0.75), (10, 20)), "medium": ((0.85, 0.90), (4, 8)), "heavy": ((0.95, 0.98), (2, 3))}
INSTRUCTIONS = "Classify the banking customer's message into one intent label. Answer with the label only."


def banking(split: str, labels: list[str] | None, n_labels: int, per_label: int) -> tuple[list[str], list[tuple]]:
    """(labels, [(text, gold label)]): the first ``per_label`` rows of each of the first
    ``n_labels`` intents (sorted by name) of BANKING77's ``split``."""
    from tests.training_data import banking_rows

    return banking_rows(DATA, split, n_labels, per_label, labels=labels)


def score_all(lm, messages: list[list[dict]], labels: list[str]) -> tuple[list[str], list[float]]:
    """Label-scored predictions and per-query latencies (ms), one query at a time after one
    warm-up query."""
    lm.score_labels(messages[0], labels)
    preds, lats = [], []
    for m in messages:
        t0 = time.perf_counter()
        probs = lm.score_labels(m, labels)
        lats.append((time.perf_counter() - t0) * 1000)
        preds.append(max(probs, key=probs.get))
    return preds, lats


def folder_mb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 labels, 8 train / 4 held-out per label, 2 epochs")
    ap.add_argument("--labels", type=int)
    ap.add_argument("--train-per-label", type=int)
    ap.add_argument("--test-per-label", type=int)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--learning-rate", type=float, help="default: the product's (sft-full fast: 5e-5)")
    ap.add_argument("--presets", default="light,medium,heavy")
    a = ap.parse_args()
    n_labels = a.labels or (4 if a.quick else 10)
    n_train = a.train_per_label or (8 if a.quick else 40)
    n_test = a.test_per_label or (4 if a.quick else 20)
    epochs = a.epochs or (2.0 if a.quick else 3.0)
    presets = [p for p in a.presets.split(",") if p]
    threads = int(os.environ.get("DISTILLHUB_TORCH_THREADS") or min(2, os.cpu_count() or 1))
    os.environ["DISTILLHUB_TORCH_THREADS"] = str(threads)

    import torch

    torch.set_num_threads(threads)
    from workers.pipeline import prompts
    from workers.pipeline.local_lm import LocalCausalLM
    from workers.pipeline.registry import SMOLLM2, resolve_model
    from workers.pipeline.security import SecurityPolicy
    from workers.pipeline.specs import TaskSpec
    from workers.pipeline.training import TrainRow, TrainSpec, apply_student_size, resolve_hyperparams, train

    labels, train_pairs = banking("train", None, n_labels, n_train)
    _, test_pairs = banking("test", labels, n_labels, n_test)
    task = TaskSpec(task_type="classification", labels=tuple(labels), instructions=INSTRUCTIONS)
    t_start = time.perf_counter()
    teacher_src = resolve_model(SMOLLM2)
    teacher = LocalCausalLM.load(SMOLLM2, kind="base", device="cpu")
    # The curated dataset: the teacher's labels on the training queries (no gold used in training).
    t_train_labels, _ = score_all(teacher, [prompts.teacher_messages(task, q) for q, _ in train_pairs], labels)
    t_test, t_lats = score_all(teacher, [prompts.teacher_messages(task, q) for q, _ in test_pairs], labels)
    gold = [g for _, g in test_pairs]
    t_acc = sum(p == g for p, g in zip(t_test, gold)) / len(gold)
    t_p50 = statistics.median(t_lats)
    # The student answers a short prompt ("Label: {query}"), the teacher its long instructions: the
    # speed-up above includes that. The teacher on the student's prompt isolates the layer cut.
    _, t_lats_short = score_all(teacher, [prompts.student_messages(task, q) for q, _ in test_pairs], labels)
    t_p50_short = statistics.median(t_lats_short)
    t_params = sum(p.numel() for p in teacher.model.parameters())
    t_mb = folder_mb(teacher_src)
    del teacher
    print(f"BANKING77: {n_labels} labels, {len(train_pairs)} training queries (teacher-labelled), "
          f"{len(test_pairs)} held-out test queries; {epochs:g} epochs; torch threads {threads}")
    print(f"teacher SmolLM2-135M (30 layers, {t_params / 1e6:.0f} M parameters, {t_mb:.0f} MB): accuracy "
          f"{t_acc:.3f}, label-scoring p50 {t_p50:.1f} ms ({t_p50_short:.1f} ms on the student's short prompt); agreement of its training labels with gold "
          f"{sum(p == g for p, (_, g) in zip(t_train_labels, train_pairs)) / len(train_pairs):.3f}")

    rows = [TrainRow(query=q, answer=tl, label=tl, teacher_label=tl) for (q, _), tl in zip(train_pairs, t_train_labels)]
    out: dict = {"teacher_accuracy": round(t_acc, 4), "teacher_latency_ms_p50": round(t_p50, 2),
                 "teacher_latency_ms_p50_student_prompt": round(t_p50_short, 2)}
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = SecurityPolicy().with_model_dirs(tmp)
        for size in presets:
            overrides = {"num_train_epochs": epochs, "per_device_train_batch_size": 8, "max_length": 128,
                         "logging_steps": 5, "early_stopping_patience": 0}
            if a.learning_rate:
                overrides["learning_rate"] = a.learning_rate
            hp = resolve_hyperparams("logit-kd", "fast", overrides)
            hp = apply_student_size(hp, method="logit-kd", preset="fast", size=size, overrides=overrides)
            spec = TrainSpec(method="logit-kd", student_model=SMOLLM2, teacher_model=SMOLLM2, task=task,
                             train_rows=rows, val_rows=[], hyperparams=hp, output_dir=f"{tmp}/{size}/out",
                             checkpoint_dir=f"{tmp}/{size}/ckpt", policy=policy)
            t0 = time.perf_counter()
            res = train(spec)
            train_s = time.perf_counter() - t0
            merged = f"{tmp}/{size}/out/merged"
            lm = LocalCausalLM.load(merged, kind="merged", device="cpu", policy=policy)
            s_test, s_lats = score_all(lm, [prompts.student_messages(task, q) for q, _ in test_pairs], labels)
            acc = sum(p == g for p, g in zip(s_test, gold)) / len(gold)
            fid = sum(p == t for p, t in zip(s_test, t_test)) / len(gold)
            p50 = statistics.median(s_lats)
            pf = res.preflight
            row = {"preset": size, "layers": pf["student_layers"], "params_m": pf["student_parameters"] / 1e6,
                   "mb": folder_mb(merged), "accuracy": acc, "retention": acc / t_acc if t_acc else None,
                   "fidelity": fid, "p50_ms": p50, "speedup": t_p50 / p50, "speedup_same_prompt": t_p50_short / p50,
                   "train_s": train_s,
                   "steps": res.global_step, "train_loss": res.train_loss}
            table.append(row)
            print(f"  {size}: {row['layers']}/30 layers trained {res.global_step} steps in {train_s:.0f} s "
                  f"(loss {res.train_loss:.3f}); accuracy {acc:.3f}", flush=True)
            del lm
            out.update({f"retention_{size}": round(row["retention"], 4) if row["retention"] is not None else None,
                        f"speedup_{size}": round(row["speedup"], 3),
                        f"speedup_same_prompt_{size}": round(row["speedup_same_prompt"], 3), f"fidelity_{size}": round(fid, 4),
                        f"accuracy_{size}": round(acc, 4), f"layers_{size}": row["layers"],
                        f"size_ratio_{size}": round(row["mb"] / t_mb, 4)})
    print()
    print(f"{'preset':8} {'layers':>7} {'params':>8} {'size':>8} {'accuracy':>9} {'retention':>10} "
          f"{'fidelity':>9} {'p50 ms':>8} {'speed-up':>9} {'same prompt':>12}   seed target (retention / speed-up)")
    print(f"{'teacher':8} {30:>7} {t_params / 1e6:>7.0f}M {t_mb:>6.0f}MB {t_acc:>9.3f} {'100.0 %':>10} "
          f"{'-':>9} {t_p50:>8.1f} {'1.0x':>9} {'1.0x':>12}")
    for r in table:
        (rlo, rhi), (slo, shi) = SEED_TARGETS[r["preset"]]
        ret = f"{r['retention'] * 100:.1f} %" if r["retention"] is not None else "-"
        print(f"{r['preset']:8} {str(r['layers']) + '/30':>7} {r['params_m']:>7.0f}M {r['mb']:>6.0f}MB "
              f"{r['accuracy']:>9.3f} {ret:>10} {r['fidelity']:>9.3f} {r['p50_ms']:>8.1f} {r['speedup']:>8.1f}x {r['speedup_same_prompt']:>11.1f}x"
              f"   {rlo * 100:.0f}-{rhi * 100:.0f} % / {slo}-{shi}x")
    print(f"total {time.perf_counter() - t_start:.0f} s. Speed-up is bounded here by what a layer cut keeps: "
          "SmolLM2's embedding matrix (tied LM head, 28 M parameters) is kept whole by every preset.")
    out.update({"labels": n_labels, "train_rows": len(train_pairs), "test_rows": len(test_pairs), "epochs": epochs,
                "threads": threads})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
