"""Helpers for the generation tests: BANKING77 queries written with the ORM (the ingest service
is another area's), and a project built from them."""
from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from pathlib import Path

INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "pending_top_up")


def banking77_rows(shared_data: Path, per_intent: int = 5, intents=INTENTS) -> list[tuple[str, str]]:
    """The first ``per_intent`` training texts of each intent: ``[(text, intent)]``."""
    out: dict[str, list[str]] = {i: [] for i in intents}
    with open(shared_data / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            lst = out.get(row["category"])
            if lst is not None and len(lst) < per_intent:
                lst.append(row["text"])
    return [(t, i) for i in intents for t in out[i]]


def add_queries(project, texts_and_refs, split: str = "train") -> list:
    """Create Query rows directly (text_hash as the ingest service defines it)."""
    from projects.models import Query

    rows = []
    for n, (text, ref) in enumerate(texts_and_refs, 1):
        norm = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
        rows.append(Query(project=project, text=text, text_hash=hashlib.sha256(norm.encode()).hexdigest(), split=split,
                          reference=ref, line=n))
    return Query.objects.bulk_create(rows)


def banking_project(team, owner, name="Banking intents"):
    from projects.services.projects import project_create

    return project_create(team=team, user=owner, name=name, task_type="classification", labels=list(INTENTS),
                          instructions="Classify the bank customer's message into one intent.")
