"""Benchmark and check of the GPU path: every training method and the student's inference on
CUDA, in bf16 where the card supports it (workers.pipeline.training picks CUDA + bf16 by itself).

For each method (sft-lora, sft-full, logit-kd, classifier-kd) it trains one run through
``workers.pipeline.training.train`` on BANKING77 queries (the label as the answer; a one-hot soft
label with 0.1 smoothing for classifier-kd), then loads the merged sft-lora student with
``LocalCausalLM`` and times greedy batched generation and label scoring. Figures per method:
``train_seconds``, ``tokens_per_s`` (tokenized training rows x epochs / wall time of
``trainer.train()``; examples per second for classifier-kd), ``peak_gpu_mb``
(``torch.cuda.max_memory_allocated``), ``first_loss`` / ``train_loss`` (mean over the run),
``device`` and ``dtype``. Checks (non-zero exit when one fails): the run used the GPU, the loss is
finite and the last logged loss is below the first (not checked for a random-weight classifier,
which cannot beat the label prior in one epoch), every artifact folder was written.

    python bench/gpu.py [--quick] [--rows N] [--epochs E] [--methods M,M] [--json PATH]
    python bench/gpu.py --random-init smollm2=DIR --random-init minilm=DIR

``--random-init NAME=DIR``: use a model with the bundled model's architecture and tokenizer (the
``config.json`` and tokenizer files in DIR) and random weights, for a machine that has the
code but not the bundled model packages; speed figures hold, quality figures mean nothing then.
Prints the figures and, as its last line, one JSON object (also written to ``--json``).
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


def banking_rows(n: int) -> list[tuple[str, str]]:
    """``n`` (query, label) pairs spread over BANKING77's train.csv."""
    with open(DATA / "banking77" / "train.csv", encoding="utf-8", newline="") as f:
        data = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    return data[:: max(1, len(data) // n)][:n]


def random_init(kind: str, src: Path, out: Path) -> str:
    """Save a random-weight model with ``src``'s config and tokenizer to ``out``; returns the path.
    ``kind``: ``causal`` (SmolLM2) or ``encoder`` (MiniLM)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = cls.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def run_method(method: str, student: str, teacher: str | None, pairs, labels, epochs: float, tmp: Path,
               random_weights: bool = False) -> dict:
    import torch

    from workers.pipeline.specs import TaskSpec
    from workers.pipeline.training import TrainRow, TrainSpec, resolve_hyperparams, train

    task = TaskSpec(task_type="classification", labels=tuple(labels))
    if method == "classifier-kd":
        def probs(label):
            rest = 0.1 / (len(labels) - 1)
            return {l: (0.9 if l == label else rest) for l in labels}
        rows = [TrainRow(query=q, answer=l, label=l, teacher_label=l, label_probs=probs(l)) for q, l in pairs]
        overrides = {"num_train_epochs": epochs, "per_device_train_batch_size": 64, "max_length": 64,
                     "early_stopping_patience": 0, "logging_steps": 5}
    else:
        rows = [TrainRow(query=q, answer=l, label=l) for q, l in pairs]
        overrides = {"num_train_epochs": epochs, "per_device_train_batch_size": 32, "max_length": 128,
                     "early_stopping_patience": 0, "logging_steps": 5}
        if method == "logit-kd":
            overrides["teacher"] = teacher
    out = tmp / method
    spec = TrainSpec(method=method, student_model=student, task=task, train_rows=rows, val_rows=[],
                     hyperparams=resolve_hyperparams(method, "fast", overrides), output_dir=str(out / "out"),
                     checkpoint_dir=str(out / "ckpt"), teacher_model=teacher if method == "logit-kd" else None)
    losses: list[float] = []
    preflight: dict = {}

    def report(event, data):
        if event == "metric" and data.get("split") == "train" and data.get("loss") is not None:
            losses.append(float(data["loss"]))
        elif event == "preflight":
            preflight.update(data)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = train(spec, report=report)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    unit = "examples_per_s" if method == "classifier-kd" else "tokens_per_s"
    amount = len(rows) * math.ceil(epochs) if method == "classifier-kd" else res.train_tokens
    figures = {
        "method": method, "rows": len(rows), "steps": res.global_step, "train_seconds": round(res.train_seconds, 2),
        unit: round(amount / res.train_seconds, 1), "peak_gpu_mb": round(peak, 1) if peak is not None else None,
        "first_loss": round(losses[0], 4) if losses else None, "last_loss": round(losses[-1], 4) if losses else None,
        "train_loss": res.train_loss, "device": preflight.get("device"),
        "dtype": "bfloat16" if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "float32",
        "artifacts": {a["kind"]: Path(a["path"]).exists() for a in res.artifacts},
    }
    problems = []
    if torch.cuda.is_available() and figures["device"] != "cuda":
        problems.append(f"trained on {figures['device']}, not cuda")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"loss not finite or not logged: {losses[:5]}")
    elif random_weights and method == "classifier-kd":
        figures["loss_check"] = "skipped: a random-weight encoder cannot beat the label prior in one epoch"
    elif len(losses) > 1 and not losses[-1] < losses[0]:
        problems.append(f"loss did not fall: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    if not res.artifacts or not all(figures["artifacts"].values()):
        problems.append(f"artifacts missing: {figures['artifacts']}")
    figures["problems"] = problems
    figures["merged"] = next((a["path"] for a in res.artifacts if a["kind"] == "merged"), None)
    return figures


def inference(merged: str, pairs, labels) -> dict:
    """Greedy generation (batches of 32, 8 new tokens) and label scoring with the merged student."""
    import torch

    from workers.pipeline import prompts
    from workers.pipeline.local_lm import LocalCausalLM
    from workers.pipeline.specs import TaskSpec

    task = TaskSpec(task_type="classification", labels=tuple(labels))
    from workers.pipeline.security import SecurityPolicy

    # The benchmark's own output folder, allowed as DISTILLHUB_MODEL_DIRS would allow it.
    lm = LocalCausalLM.load(merged, kind="merged", policy=SecurityPolicy.from_env().with_model_dirs(merged))
    msgs = [prompts.student_messages(task, q) for q, _ in pairs[:256]]
    lm.generate_batch(msgs[:8], max_new_tokens=8)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(msgs), 32):
        lm.generate_batch(msgs[i:i + 32], max_new_tokens=8)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in msgs[:32]:
        lm.score_labels(m, labels)
    score_s = time.perf_counter() - t0
    return {"device": lm.device, "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "generate_queries_per_s": round(len(msgs) / gen_s, 1),
            "score_labels_ms_per_query": round(1000 * score_s / 32, 2), "labels": len(labels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 rows, sft-lora and classifier-kd only (a CPU smoke run)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--methods", default="sft-lora,sft-full,logit-kd,classifier-kd")
    ap.add_argument("--random-init", action="append", default=[], metavar="NAME=DIR",
                    help="smollm2=DIR or minilm=DIR: config and tokenizer files, random weights")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.methods = 64, "sft-lora,classifier-kd"

    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    print("environment:", json.dumps(env))
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    causal, encoder = "smollm2-135m-instruct", "minilm-l6"
    random_weights = []
    for item in args.random_init:
        name, _, folder = item.partition("=")
        if name == "smollm2":
            causal = random_init("causal", Path(folder), tmp / "smollm2-random")
        elif name == "minilm":
            encoder = random_init("encoder", Path(folder), tmp / "minilm-random")
        else:
            ap.error(f"--random-init: unknown model {name!r} (smollm2 or minilm)")
        random_weights.append(name)
    pairs = banking_rows(args.rows)
    labels = sorted({l for _, l in pairs})
    results, problems = [], []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        student = encoder if method == "classifier-kd" else causal
        try:
            random_student = ("minilm" if method == "classifier-kd" else "smollm2") in random_weights
            r = run_method(method, student, causal, pairs, labels, args.epochs, tmp, random_student)
        except Exception as exc:  # report every method, then fail
            r = {"method": method, "problems": [f"{exc.__class__.__name__}: {exc}"]}
        print(f"{method}: " + json.dumps({k: v for k, v in r.items() if k != "merged"}))
        problems += [f"{method}: {p}" for p in r["problems"]]
        results.append(r)
    infer = None
    merged = next((r.get("merged") for r in results if r["method"] == "sft-lora" and r.get("merged")), None)
    if merged:
        try:
            infer = inference(merged, pairs, labels)
            print("inference:", json.dumps(infer))
            if torch.cuda.is_available() and infer["device"] != "cuda":
                problems.append(f"inference ran on {infer['device']}")
        except Exception as exc:
            problems.append(f"inference: {exc.__class__.__name__}: {exc}")
    for r in results:
        r.pop("merged", None)
    result = {"environment": env, "random_weights": random_weights, "rows": len(pairs), "epochs": args.epochs,
              "methods": results, "inference": infer, "problems": problems, "ok": not problems}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print("problems:", problems or "none")
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
