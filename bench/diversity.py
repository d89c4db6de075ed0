"""Benchmark: diverse query selection (``workers.pipeline.diversity``) on BANKING77.

Takes the training texts of BANKING77 in file order (grouped by intent, as an import of a
sorted file would be), embeds them with the bundled MiniLM, and reports: embedding throughput
(texts/s), k-means selection time for N = 1 % of the pool, how many distinct intents N
``diverse`` picks cover versus the first N by id, and the near-duplicate pairs and groups at
cosine >= 0.95. The last line is one JSON object.

    python bench/diversity.py [--quick]
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
    ap.add_argument("--quick", action="store_true", help="about a minute: 500 texts instead of 5000")
    args = ap.parse_args()
    n_pool = 500 if args.quick else 5000

    from workers.pipeline.diversity import embed_texts, near_duplicates, select_diverse

    data = Path(os.environ.get("DISTILLHUB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with open(data / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)][:n_pool]
    texts = [t for t, _ in rows]
    embed_texts(texts[:8])  # load once, so the figure is the steady rate
    t0 = time.perf_counter()
    emb = embed_texts(texts)
    embed_s = time.perf_counter() - t0
    n = max(4, n_pool // 100)
    t0 = time.perf_counter()
    picks = select_diverse(emb, n, seed=0)
    select_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = near_duplicates(emb, threshold=0.95)
    dup_s = time.perf_counter() - t0
    intents_pool = len({i for _, i in rows})
    intents_first = len({i for _, i in rows[:n]})
    intents_diverse = len({rows[p][1] for p in picks})
    out = {"texts": n_pool, "n": n, "embed_texts_per_s": round(n_pool / embed_s, 1), "select_s": round(select_s, 2),
           "near_duplicates_s": round(dup_s, 3), "intents_in_pool": intents_pool, "intents_first": intents_first,
           "intents_diverse": intents_diverse, "near_duplicate_pairs": len(report.pairs),
           "near_duplicate_groups": len(report.groups), "load_average_1m": round(os.getloadavg()[0], 1)}
    print(f"{n_pool} BANKING77 texts, {intents_pool} intents; CPU load average {out['load_average_1m']}")
    print(f"embedding (MiniLM-L6, mean pooling): {out['embed_texts_per_s']} texts/s")
    print(f"k-means selection of {n}: {out['select_s']} s; intents covered: diverse {intents_diverse}, "
          f"first {n} by id {intents_first}")
    print(f"near-duplicates (cosine >= 0.95): {len(report.pairs)} pairs in {len(report.groups)} groups, {dup_s:.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
