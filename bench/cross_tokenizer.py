"""Benchmark: cross-tokenizer logit distillation (logit-kd with ``uld_weight``, Universal Logit
Distillation, Boizard et al. 2024) against plain response-based SFT (``sft-lora``; ``sft-full``
without ``--quick``) on the same curated rows.

Data: Yelp sentences of UCI Sentiment Labelled Sentences (``/work/shared/data/
sentiment_labelled_sentences``), labels ``negative``/``positive``: ``--train`` training and
``--test`` held-out sentences per label; the curated answer of every training sentence is its
gold label, as an API teacher that answers correctly would give it.

Teacher distributions, stored as an API teacher's ``top_logprobs`` (top 20 per answer token):
the bundled SmolLM2-135M-Instruct reading the *teacher's* prompt (instructions + the label list,
``prompts.teacher_messages``), teacher-forced on the answer. Only one causal model is bundled, so
the teacher here shares the student's tokenizer; the ULD path does not use that fact (it compares
sorted probability vectors and aligns answers by position), and the tests train the same code
against a random GPT-2 teacher with another vocabulary. The student is SmolLM2-135M-Instruct
with its short prompt (``Label: {query}``) in every arm.

Quality: exact-label accuracy of greedy answers on the test queries, which equals agreement with
the teacher's answers here (they are the gold labels).

    python bench/cross_tokenizer.py [--quick]

Last line: one JSON object with ``accuracy`` per arm, ``train_seconds`` per arm, the slice sizes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))


LABELS = ("negative", "positive")


def sentiment(per_train: int, per_test: int):
    """Yelp sentences of UCI Sentiment Labelled Sentences: the first ``per_train`` of each label
    for training, the next ``per_test`` of each for the test (disjoint)."""
    rows = [line.rstrip("\n").rsplit("\t", 1) for line in
            open(DATA / "sentiment_labelled_sentences" / "yelp_labelled.tsv", encoding="utf-8") if "\t" in line]
    by = {l: [t.strip() for t, y in rows if y.strip() == str(i)] for i, l in enumerate(LABELS)}
    train = [(t, l) for l in LABELS for t in by[l][:per_train]]
    test = [(t, l) for l in LABELS for t in by[l][per_train:per_train + per_test]]
    return train, test


def api_style_logprobs(task, pairs, top_k: int = 20) -> list[list[dict]]:
    """The teacher's top-``top_k`` probabilities per answer token, in the shape generation stores
    an API teacher's ``token_logprobs`` (token texts are not needed by ULD and left blank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.pipeline.registry import resolve_model
    from workers.pipeline.training import TrainRow, teacher_answer_probs

    src = resolve_model("smollm2-135m-instruct")
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    probs = teacher_answer_probs(teacher, tok, task, [TrainRow(query=q, answer=a) for q, a in pairs],
                                 top_k=top_k, max_length=512)
    out = []
    for p in probs:
        out.append([{"token": "", "logprob": math.log(max(float(r[0]), 1e-30)),
                     "top": [["", math.log(max(float(v), 1e-30))] for v in r.tolist()]} for r in p])
    return out


def accuracy(merged_dir: str, task, test_pairs) -> float:
    from workers.pipeline.local_lm import LocalCausalLM
    from workers.pipeline.prompts import match_label, student_messages
    from workers.pipeline.security import SecurityPolicy

    lm = LocalCausalLM.load(merged_dir, kind="merged", device="cpu",
                            policy=SecurityPolicy().with_model_dirs(str(Path(merged_dir).parent.parent)))
    hits = 0
    for i in range(0, len(test_pairs), 8):
        chunk = test_pairs[i:i + 8]
        gens = lm.generate_batch([student_messages(task, q) for q, _ in chunk], max_new_tokens=16)
        hits += sum(match_label(g.text, task.labels) == gold for g, (_, gold) in zip(gens, chunk))
    return hits / len(test_pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 training sentences per label, sft-lora vs ULD only")
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None)
    args = ap.parse_args()
    os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")  # a shared CPU: see training._limit_threads
    import torch

    torch.set_num_threads(int(os.environ["DISTILLHUB_TORCH_THREADS"]))
    from workers.pipeline.specs import TaskSpec
    from workers.pipeline.training import TrainRow, TrainSpec, resolve_hyperparams, train

    n_labels = len(LABELS)
    per_train = args.train or (12 if args.quick else 40)
    per_test = args.test or (10 if args.quick else 40)
    epochs = args.epochs or 2.0
    train_pairs, test_pairs = sentiment(per_train, per_test)
    task = TaskSpec(task_type="classification", labels=LABELS,
                    instructions="Classify the sentiment of the restaurant review.")
    t0 = time.perf_counter()
    lps = api_style_logprobs(task, train_pairs)
    teacher_s = time.perf_counter() - t0
    print(f"teacher distributions for {len(train_pairs)} rows in {teacher_s:.1f} s", flush=True)
    common = {"num_train_epochs": epochs, "per_device_train_batch_size": 4 if args.quick else 8, "logging_steps": 1,
              "early_stopping_patience": 0, "max_length": 128}
    arms = {"sft-lora": ("sft-lora", {}),
            "uld": ("logit-kd", {"uld_weight": 1.0, "teacher": "samples"})}
    if not args.quick:
        arms["sft-full"] = ("sft-full", {"learning_rate": 5e-5})
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-xtok-") as tmp:
        for arm, (method, extra) in arms.items():
            rows = [TrainRow(query=q, answer=a, token_logprobs=lp if method == "logit-kd" else None)
                    for (q, a), lp in zip(train_pairs, lps)]
            spec = TrainSpec(method=method, student_model="smollm2-135m-instruct", task=task, train_rows=rows,
                             val_rows=[], hyperparams=resolve_hyperparams(method, "fast", {**common, **extra}),
                             output_dir=f"{tmp}/{arm}/out", checkpoint_dir=f"{tmp}/{arm}/ckpt")
            losses = []
            res = train(spec, report=lambda e, d: losses.append(d) if e == "metric" and d["split"] == "train" else None)
            acc = accuracy(f"{tmp}/{arm}/out/merged", task, test_pairs)
            results[arm] = {"accuracy": round(acc, 4), "train_seconds": round(res.train_seconds, 1),
                            "loss_first": round(losses[0]["loss"], 4), "loss_last": round(losses[-1]["loss"], 4),
                            "components_last": losses[-1].get("components")}
            print(f"{arm:9s} accuracy {acc:6.1%} (= agreement with the teacher's answers)  "
                  f"train {res.train_seconds:6.1f} s  loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}"
                  + (f"  last components {losses[-1]['components']}" if losses[-1].get("components") else ""),
                  flush=True)
    chance = 1 / n_labels
    print(f"{n_labels} labels, {len(train_pairs)} training rows, {len(test_pairs)} test queries; chance {chance:.1%}; "
          f"teacher distributions (top 20 per answer token) in {teacher_s:.1f} s")
    print(json.dumps({"quick": args.quick, "labels": n_labels, "train_rows": len(train_pairs),
                      "test_rows": len(test_pairs), "epochs": epochs, "chance": round(chance, 4),
                      "accuracy": {k: v["accuracy"] for k, v in results.items()},
                      "train_seconds": {k: v["train_seconds"] for k, v in results.items()},
                      "arms": results}))


if __name__ == "__main__":
    main()
