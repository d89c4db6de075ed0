"""The ingest parser (workers/pipeline/ingest.py) on real-world file shapes: encodings, line
endings, quoting, blank lines, Excel exports, JSONL variants; exact texts and line numbers."""
from __future__ import annotations

import codecs
import collections

import pytest

from workers.pipeline.ingest import (
    MAX_QUERY_CHARS, IngestError, ParsedRow, SkippedRow, clean_text, normalise_text, read_rows, sniff_file,
    split_for_hash, text_hash,
)


def parse(tmp_path, name: str, data: bytes, **kw):
    path = tmp_path / name
    path.write_bytes(data)
    fmt = sniff_file(path, name)
    columns = []
    rows = list(read_rows(path, fmt, on_columns=columns.append, **kw))
    ok = [r for r in rows if isinstance(r, ParsedRow)]
    skipped = [(r.line, r.reason) for r in rows if isinstance(r, SkippedRow)]
    return fmt, ok, skipped, (columns[0] if columns else None)


def test_utf8_bom_csv_with_crlf_and_quoted_multiline_field(tmp_path):
    data = codecs.BOM_UTF8 + (
        'question,label,source\r\n'
        'Where is my café?,card_arrival,web\r\n'
        '"A message\r\nover two lines, with a comma",refund,app\r\n'
        '\r\n'
        'Last one,refund,web\r\n'
    ).encode("utf-8")
    fmt, ok, skipped, cols = parse(tmp_path, "export.csv", data)
    assert fmt.encoding == "utf-8-sig"
    assert cols.columns == ["question", "label", "source"] and cols.text == "question" and cols.reference == "label"
    assert [(r.line, r.text, r.reference, r.metadata) for r in ok] == [
        (2, "Where is my café?", "card_arrival", {"source": "web"}),
        (3, "A message\nover two lines, with a comma", "refund", {"source": "app"}),
        (6, "Last one", "refund", {"source": "web"}),
    ]
    assert skipped == [(5, "empty")]
    assert not any("\r" in r.text or "\ufeff" in r.text for r in ok)


def test_cr_only_line_endings_text_file(tmp_path):
    fmt, ok, skipped, _ = parse(tmp_path, "old-mac.txt", b"first\rsecond\r\rthird\r")
    assert fmt.kind == "text"
    assert [(r.line, r.text) for r in ok] == [(1, "first"), (2, "second"), (4, "third")]
    assert skipped == [(3, "empty")]


def test_utf16_excel_unicode_text_export(tmp_path):
    # Excel's "Unicode Text": UTF-16 LE with BOM, tab-separated, CRLF, quotes around fields with tabs.
    text = 'text\tintent\r\nÇa coûte combien ?\tprice\r\n"tab\tinside"\tother\r\n'
    fmt, ok, skipped, cols = parse(tmp_path, "export.txt", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    # A .txt is one query per line: ask for CSV through the extension of a TSV instead.
    fmt, ok, skipped, cols = parse(tmp_path, "export.tsv", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    assert fmt.encoding == "utf-16" and fmt.delimiter == "\t"
    assert [(r.line, r.text, r.reference) for r in ok] == [(2, "Ça coûte combien ?", "price"), (3, "tab\tinside", "other")]
    assert skipped == []


def test_windows_1252_is_detected_not_guessed(tmp_path):
    lines = ["query", "Un café, s'il vous plaît", "Déjà vu à la crème brûlée", "Naïve résumé — “quoted”"]
    raw = "\r\n".join(f'"{x}"' if "," in x else x for x in lines)
    fmt, ok, skipped, _ = parse(tmp_path, "legacy.csv", raw.encode("cp1252"))
    assert fmt.encoding == "cp1252"
    assert [r.text for r in ok] == lines[1:]


def test_excel_sep_line_and_semicolons(tmp_path):
    fmt, ok, skipped, cols = parse(tmp_path, "excel.csv", b"sep=;\r\nText;Label\r\nhello there;greet\r\n;greet\r\n")
    assert fmt.delimiter == ";" and cols.text == "Text" and cols.reference == "Label"
    assert [(r.line, r.text, r.reference) for r in ok] == [(3, "hello there", "greet")]
    assert skipped == [(4, "empty: no text in column 'Text'")]


def test_csv_column_choice_missing_column_and_too_long(tmp_path):
    long = "x" * (MAX_QUERY_CHARS + 1)
    data = f"id,body,answer\n1,short one,a\n2\n3,{long},b\n".encode()
    fmt, ok, skipped, cols = parse(tmp_path, "q.csv", data, text_column="body", reference_column="answer")
    assert [(r.line, r.text, r.reference, r.metadata) for r in ok] == [(2, "short one", "a", {"id": "1"})]
    assert skipped == [(3, "missing column: 'body' (row has 1 field)"),
                       (4, f"too long: {MAX_QUERY_CHARS + 1} characters (max {MAX_QUERY_CHARS})")]
    with pytest.raises(IngestError, match="text column: no column 'nope'; the columns are 'id', 'body', 'answer'"):
        parse(tmp_path, "q.csv", data, text_column="nope")


def test_default_text_column_is_the_first_without_a_known_name(tmp_path):
    _, ok, _, cols = parse(tmp_path, "a.csv", b"utterance_id,content\nu1,hi\n")
    assert cols.text == "utterance_id" and ok[0].text == "u1"
    _, ok, _, cols = parse(tmp_path, "a.csv", b"content,message\nx,hi there\n")
    assert cols.text == "message" and ok[0].text == "hi there"


def test_jsonl_variants_and_bad_lines(tmp_path):
    lines = [
        '{"query": "What is my balance?", "reference": "balance", "user": 7}',
        '{"text": "Second &amp; last &lt;3"}',
        '',
        '{"query": broken',
        '{"prompt_id": 3}',
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "old"},'
        ' {"role": "assistant", "content": "x"}, {"role": "user", "content": "Cancel my card"},'
        ' {"role": "assistant", "content": "cancel_card"}]}',
        '{"query": "   "}',
    ]
    fmt, ok, skipped, _ = parse(tmp_path, "q.jsonl", "\n".join(lines).encode())
    assert fmt.kind == "jsonl"
    assert [(r.line, r.text, r.reference, r.metadata) for r in ok] == [
        (1, "What is my balance?", "balance", {"user": 7}),
        (2, "Second & last <3", None, {}),
        (6, "Cancel my card", "cancel_card", {"system": "Be brief."}),
    ]
    assert skipped[0] == (3, "empty")
    assert skipped[1][0] == 4 and skipped[1][1].startswith("malformed JSON: Expecting value")
    assert skipped[2:] == [(5, "missing column: no 'query', 'text' or 'messages' key"), (7, "empty")]


def test_deeply_nested_json_rows_are_skipped_with_a_reason(tmp_path):
    too_deep = "malformed JSON: nested more than 32 levels deep"
    lines = [
        '{"query": "fine"}',
        "[" * 100_000,  # past the interpreter's recursion limit: json.loads itself gives up
        '{"query": {"a": ' + "[" * 900 + "]" * 900 + "}}",  # parses, but no recursive walk could follow
        '{"query": "ok", "meta": ' + "[" * 40 + "]" * 40 + "}",
        '{"query": "shallow", "meta": [[[1]]]}',
    ]
    fmt, ok, skipped, _ = parse(tmp_path, "deep.jsonl", "\n".join(lines).encode())
    assert [(r.line, r.text, r.metadata) for r in ok] == [(1, "fine", {}), (5, "shallow", {"meta": [[[1]]]})]
    assert skipped == [(2, too_deep), (3, too_deep), (4, too_deep)]
    doc = '[{"query": "a"},\n {"query": ' + "[" * 50 + "]" * 50 + '},\n {"query": "b"}]'
    fmt, ok, skipped, _ = parse(tmp_path, "deep.json", doc.encode())
    assert fmt.kind == "json" and [r.text for r in ok] == ["a", "b"] and skipped == [(2, too_deep)]
    with pytest.raises(IngestError, match=r"^malformed JSON: nested too deeply \(rows may nest at most 32 levels\)$"):
        parse(tmp_path, "deeper.json", b"[" * 100_000)


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"\n\n  \n", "only blank lines"),
    (bytes(range(256)) * 50, "not a text file"),
])
def test_unreadable_files_raise_one_clear_error(tmp_path, data, message):
    with pytest.raises(IngestError, match=message):
        parse(tmp_path, "bad.csv", data)


def test_clean_and_normalise():
    assert clean_text("  It\x92s &lt;b&gt; fine\r\n ok\ufeff ") == "It’s <b> fine\n ok"
    assert normalise_text("  Ｃafé\n\tTODAY  ") == "café today"
    assert normalise_text("STRASSE") == normalise_text("straße")
    assert text_hash("Hello   World") == text_hash("hello world") != text_hash("hello worlds")
    # CESU-8 surrogate pair (as decoded with surrogatepass) is joined into one character.
    assert clean_text(b"pizza \xed\xa0\xbc\xed\xbd\x95".decode("utf-8", "surrogatepass")) == "pizza \U0001f355"


def test_split_is_deterministic_and_follows_the_fractions():
    digests = [text_hash(f"query number {i}") for i in range(20000)]
    splits = [split_for_hash(d, train=0.8, validation=0.1, test=0.1) for d in digests]
    assert splits == [split_for_hash(d, train=0.8, validation=0.1, test=0.1) for d in digests]
    c = collections.Counter(splits)
    assert 0.78 < c["train"] / 20000 < 0.82 and 0.08 < c["validation"] / 20000 < 0.12
    assert set(c) == {"train", "validation", "test"}
    assert set(split_for_hash(d, train=1.0, validation=0.0, test=0.0) for d in digests) == {"train"}


def test_sms_spam_collection_quirks(shared_data, tmp_path):
    path = shared_data / "sms_spam" / "SMSSpamCollection.tsv"
    fmt = sniff_file(path, path.name)
    cols = []
    rows = list(read_rows(path, fmt, on_columns=cols.append))
    assert cols[0].header is False and cols[0].text == "column_2"
    assert len(rows) == 5574 and all(isinstance(r, ParsedRow) for r in rows)
    texts = [r.text for r in rows]
    assert not any("&lt;" in t or "&amp;" in t or "\x92" in t for t in texts)
    # Quotes are text here: the message on line 801 starts with one and is kept whole.
    assert rows[800].line == 801 and rows[800].text.startswith('"Gimme a few" was  <#>  minutes ago')
    assert collections.Counter(r.metadata["column_1"] for r in rows) == {"ham": 4827, "spam": 747}
    assert len({text_hash(t) for t in texts}) == 5158
