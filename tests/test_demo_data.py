"""The demo project's data files (demo/): the shape the demo and the README promise."""
from __future__ import annotations

import csv
import importlib.util
import re
import unicodedata
from collections import Counter
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo"


def _norm(text: str) -> str:
    # Same normalisation as the importer's duplicate key (NFKC, case-folded, spaces collapsed),
    # plus trailing punctuation, so near-identical rows count as duplicates here too.
    t = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return t.rstrip(" .!?")


def _rows(name: str) -> list[dict]:
    with (DEMO / name).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["text", "reference"], f"{name}: header is {reader.fieldnames}"
        return list(reader)


def _labels() -> list[str]:
    return [l.strip() for l in (DEMO / "labels.txt").read_text(encoding="utf-8").splitlines() if l.strip()]


def test_labels_are_eight_distinct_intents():
    labels = _labels()
    assert len(labels) == 8
    assert len(set(labels)) == 8
    assert all(re.fullmatch(r"[a-z_]+", l) for l in labels)


def test_queries_cover_every_intent_evenly():
    rows = _rows("queries.csv")
    assert 300 <= len(rows) <= 400
    counts = Counter(r["reference"] for r in rows)
    assert set(counts) == set(_labels())
    assert min(counts.values()) >= 40
    assert max(counts.values()) - min(counts.values()) <= 5


def test_golden_set_covers_every_intent():
    rows = _rows("golden.csv")
    assert 40 <= len(rows) <= 60
    counts = Counter(r["reference"] for r in rows)
    assert set(counts) == set(_labels())
    assert min(counts.values()) >= 5


def test_no_duplicates_and_no_golden_overlap():
    queries = [_norm(r["text"]) for r in _rows("queries.csv")]
    golden = [_norm(r["text"]) for r in _rows("golden.csv")]
    dup_q = [t for t, n in Counter(queries).items() if n > 1]
    dup_g = [t for t, n in Counter(golden).items() if n > 1]
    assert dup_q == [] and dup_g == []
    assert set(queries) & set(golden) == set()


def test_every_text_is_a_sensible_message():
    for name in ("queries.csv", "golden.csv"):
        for i, row in enumerate(_rows(name), start=2):
            text = row["text"]
            assert 5 <= len(text) <= 300, f"{name} line {i}: length {len(text)}"
            assert "{" not in text and "}" not in text, f"{name} line {i}: unfilled slot in {text!r}"
            assert text == text.strip()


def test_instructions_name_every_label():
    text = (DEMO / "instructions.txt").read_text(encoding="utf-8")
    for label in _labels():
        assert label in text


def test_files_match_their_generator():
    # build_data.py is deterministic: the committed files are exactly what it writes.
    spec = importlib.util.spec_from_file_location("demo_build_data", DEMO / "build_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows, golden = mod.build()
    assert [(r["text"], r["reference"]) for r in _rows("queries.csv")] == rows
    assert [(r["text"], r["reference"]) for r in _rows("golden.csv")] == golden
    assert _labels() == list(mod.TEMPLATES)
