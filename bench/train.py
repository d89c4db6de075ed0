"""Benchmark: tokens per second of DistillHub's sft-lora path (workers.pipeline.training.train:
preflight, report callback with cancel checks, checkpoints) against a plain TRL SFTTrainer
script with the same model, data, LoRA and optimiser settings, and the peak memory (RSS) of each.

Each side runs in its own subprocess (so peak RSS is its own), on the bundled SmolLM2-135M,
BANKING77 queries as prompts and their labels as answers. Tokens per second = tokens in the
tokenized training rows x epochs / wall time of ``trainer.train()``.

    python bench/train.py [--quick] [--rows N]

Last line: one JSON object with ``tokens_per_s`` (ours), ``tokens_per_s_trl``, ``ratio_vs_trl``
(ours / TRL; >= 1.0 means our orchestration costs nothing). Both sides train in float32 on the
CPU: TRL's SFTConfig otherwise turns on bf16 autocast by itself, even on a CPU, which measured
about 1.7x faster here, and that is a precision choice rather than orchestration, ``peak_rss_mb`` (ours, whole run
including saving the artifacts), ``peak_rss_mb_trl``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))
HP = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "logging_steps": 5, "max_length": 256,
      "early_stopping_patience": 0}


def rows(n: int):
    data = list(csv.DictReader(open(DATA / "banking77" / "train.csv", encoding="utf-8")))
    return [(r["text"], r["category"]) for r in data[:: max(1, len(data) // n)][:n]]


def run_ours(n: int, out: str) -> dict:
    from workers.pipeline.specs import TaskSpec
    from workers.pipeline.training import TrainRow, TrainSpec, resolve_hyperparams, train

    pairs = rows(n)
    task = TaskSpec(task_type="classification", labels=tuple(sorted({l for _, l in pairs})))
    spec = TrainSpec(method="sft-lora", student_model="smollm2-135m-instruct", task=task,
                     train_rows=[TrainRow(query=q, answer=l) for q, l in pairs], val_rows=[],
                     hyperparams=resolve_hyperparams("sft-lora", "fast", HP), output_dir=out + "/out",
                     checkpoint_dir=out + "/ckpt")
    res = train(spec, report=lambda e, d: None, check_stop=lambda: None)
    return {"tokens": res.train_tokens, "seconds": res.train_seconds}


def run_trl(n: int, out: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from workers.pipeline.registry import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    hp = {**__import__("workers.pipeline.training", fromlist=["PRESETS"]).PRESETS["sft-lora"]["fast"], **HP}
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "Label: " + q}],
                             "completion": [{"role": "assistant", "content": l}]} for q, l in rows(n)])
    args = SFTConfig(output_dir=out + "/trl", num_train_epochs=hp["num_train_epochs"],
                     per_device_train_batch_size=hp["per_device_train_batch_size"], learning_rate=hp["learning_rate"],
                     lr_scheduler_type=hp["lr_scheduler_type"], max_length=hp["max_length"],
                     logging_steps=hp["logging_steps"], report_to=[], save_strategy="no", disable_tqdm=True,
                     use_cpu=True, bf16=False, seed=hp["seed"])  # the same fp32 as our CPU path
    peft = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=hp["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * int(hp["num_train_epochs"])
    t0 = time.perf_counter()
    trainer.train()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def child(mode: str, n: int) -> None:
    threads = os.environ.get("DISTILLHUB_TORCH_THREADS")
    if threads:  # the same CPU threads for both sides (our path applies it too)
        import torch

        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as out:
        r = run_ours(n, out) if mode == "ours" else run_trl(n, out)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(r), flush=True)


def spawn(mode: str, n: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(n)], cwd=str(REPO),
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about a minute: 48 rows, one epoch")
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--child", choices=["ours", "trl"])
    a = ap.parse_args()
    n = a.rows or (48 if a.quick else 256)
    if a.child:
        child(a.child, n)
        return
    trl = spawn("trl", n)
    ours = spawn("ours", n)
    tps_ours = ours["tokens"] / ours["seconds"]
    tps_trl = trl["tokens"] / trl["seconds"]
    print(f"rows {n}, 1 epoch, SmolLM2-135M, LoRA r16 on q/k/v/o, batch 8, CPU threads {os.cpu_count()}")
    print(f"ours (DistillHub sft-lora): {ours['tokens']} tokens in {ours['seconds']:.1f} s = {tps_ours:.1f} tokens/s, "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB (incl. merge + INT8 export)")
    print(f"plain TRL SFTTrainer:       {trl['tokens']} tokens in {trl['seconds']:.1f} s = {tps_trl:.1f} tokens/s, "
          f"peak RSS {trl['peak_rss_mb']:.0f} MB")
    print(f"ratio ours / TRL: {tps_ours / tps_trl:.3f}")
    print(json.dumps({"tokens_per_s": round(tps_ours, 2), "tokens_per_s_trl": round(tps_trl, 2),
                      "ratio_vs_trl": round(tps_ours / tps_trl, 4), "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                      "peak_rss_mb_trl": round(trl["peak_rss_mb"], 1), "rows": n, "tokens": ours["tokens"]}))


if __name__ == "__main__":
    main()
