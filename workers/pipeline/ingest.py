"""Reading uploaded query files: encoding detection, streaming CSV / TSV / JSONL / JSON / text
parsers, text normalisation, the dedup hash and the deterministic split.

Plain Python, no Django. ``read_rows(path, ...)`` yields ``ParsedRow`` (a query with its source
line number) and ``SkippedRow`` (line number and reason) one at a time, so memory stays flat for
any file size; a file that cannot be read at all raises ``IngestError`` with one clear message.

Line numbers are 1-based physical lines of the file (the header is line 1 of a CSV); a row that
spans several lines (a quoted field with line breaks) has the number of its first line.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import html
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workers.pipeline.json_limits import MAX_DEPTH, json_depth, openers_at_most

#: Longest query kept, in characters; longer rows are skipped as "too long".
MAX_QUERY_CHARS = 20_000
#: Names picked as the text column when none is given (first match wins, case-insensitive).
TEXT_COLUMN_NAMES = ("text", "query", "question", "message", "sentence", "prompt", "input", "utterance")
#: Names picked as the reference column when none is given.
REFERENCE_COLUMN_NAMES = ("reference", "answer", "label", "category", "intent", "target", "output", "expected")
#: At most this many skipped rows / warnings are listed (the totals are always exact).
MAX_LISTED = 10_000

# A JSON row nested deeper than MAX_DEPTH (json.loads itself gives up near 1,000 levels) is
# skipped: its metadata could not be cleaned, encoded or stored (jsonb) without recursing.
_TOO_DEEP = f"malformed JSON: nested more than {MAX_DEPTH} levels deep"

_SAMPLE_BYTES = 256 * 1024
_CHUNK = 1 << 20
_WS = re.compile(r"\s+")
_SURROGATES = re.compile("[\ud800-\udfff]")
_C1 = re.compile("[\x80-\x9f]")
# C1 control characters are almost always Windows-1252 bytes that were decoded as Latin-1
# (U+0092 for a right single quote); map them to the characters Windows-1252 meant.
_C1_TO_CP1252 = {}
for _b in range(0x80, 0xA0):
    try:
        _C1_TO_CP1252[_b] = bytes([_b]).decode("cp1252")
    except UnicodeDecodeError:
        pass  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are undefined in cp1252: removed below
_C1_TO_CP1252.update({b: None for b in range(0x80, 0xA0) if b not in _C1_TO_CP1252})


class IngestError(Exception):
    """The file cannot be read at all (binary, empty, no text column, undecodable); nothing is
    imported. The message is safe to show to the user."""


@dataclass(frozen=True)
class ParsedRow:
    """One query read from the file: ``text`` cleaned (see ``clean_text``), ``reference`` the gold
    answer or label (None when absent), ``metadata`` the other columns/keys, ``line`` 1-based."""

    line: int
    text: str
    reference: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not imported: its 1-based ``line`` and a ``reason`` (``empty``,
    ``malformed JSON: ...``, ``missing column: ...``, ``too long: N characters (max M)``)."""

    line: int
    reason: str


@dataclass
class FileFormat:
    """What ``sniff_file`` found: ``kind`` is csv, jsonl, json or text; ``encoding`` a Python codec
    name; ``errors`` the decode error handler; ``delimiter`` / ``quoting`` for csv; ``warnings``
    list of ``{"line": int|None, "reason": str}``; ``size_bytes``; ``sha256`` of the raw bytes."""

    kind: str
    encoding: str
    errors: str = "strict"
    delimiter: str = ","
    quoting: int = csv.QUOTE_MINIMAL
    skip_first_line: bool = False  # an Excel "sep=;" line
    size_bytes: int = 0
    sha256: str = ""
    warnings: list = field(default_factory=list)


# --- normalisation, hash, split -------------------------------------------------------------


def clean_text(value: str) -> str:
    """The text as stored: HTML entities unescaped (``&lt;`` -> ``<``), Windows-1252 C1 controls
    mapped to their characters, surrogate pairs from CESU-8 joined, NUL removed, line breaks
    made ``\\n``, a stray BOM removed, outer whitespace stripped."""
    if "&" in value:
        value = html.unescape(value)
    if not value.isascii():
        if _C1.search(value):
            value = value.translate(_C1_TO_CP1252)
        if _SURROGATES.search(value):
            value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        value = value.replace("\ufeff", "")
    if "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value.strip()


def normalise_text(text: str) -> str:
    """The dedup form: Unicode NFKC, case-folded, runs of whitespace collapsed to one space,
    stripped. ``"  Café\\n TODAY "`` -> ``"café today"``."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).casefold()
    else:
        text = text.lower()
    return " ".join(text.split())


def text_digest(text: str) -> bytes:
    """sha256 digest (32 bytes) of ``normalise_text(text)`` in UTF-8; ``text_hash`` is its hex."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).digest()


def text_hash(text: str) -> str:
    """sha256 hex digest (64 characters) of ``normalise_text(text)`` in UTF-8."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def split_for_hash(digest: str, *, train: float, validation: float, test: float) -> str:
    """The split (``train``, ``validation`` or ``test``) of a query from its hex ``digest``: the
    first 64 bits as a fraction u in [0, 1); train if u < train, validation if u < train +
    validation, else test. Deterministic, so a re-import keeps every query in its split, and
    about ``train`` / ``validation`` / ``test`` of the queries land in each."""
    u = int(digest[:16], 16) / 2.0**64
    total = train + validation + test or 1.0
    if u < train / total:
        return "train"
    if u < (train + validation) / total:
        return "validation"
    return "test"


# --- encoding and format detection ----------------------------------------------------------


def _detect_encoding(path: Path, head: bytes) -> tuple[str, str, str, list, int]:
    """Returns (encoding, errors, sha256, warnings, size). Raises IngestError for binary files."""
    warnings: list = []
    if head.startswith(codecs.BOM_UTF32_LE) or head.startswith(codecs.BOM_UTF32_BE):
        enc = "utf-32"
    elif head.startswith(codecs.BOM_UTF8):
        enc = "utf-8-sig"
    elif head.startswith(codecs.BOM_UTF16_LE) or head.startswith(codecs.BOM_UTF16_BE):
        enc = "utf-16"
    else:
        enc = ""
    digest = hashlib.sha256()
    size = 0
    utf8_ok = not enc
    utf8_cesu = False
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if utf8_ok:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8_ok = False
        if utf8_ok:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                utf8_ok = False
    if size == 0:
        raise IngestError("the file is empty")
    if enc:
        return enc, "strict", digest.hexdigest(), warnings, size
    nul = head.count(b"\x00")
    if nul:
        # UTF-16 without a BOM has a NUL in every other byte of ASCII text; anything else with
        # NULs is binary.
        even, odd = head[0::2].count(b"\x00"), head[1::2].count(b"\x00")
        if odd > 0.3 * len(head) / 2 and even < 0.05 * len(head) / 2:
            return "utf-16-le", "strict", digest.hexdigest(), warnings, size
        if even > 0.3 * len(head) / 2 and odd < 0.05 * len(head) / 2:
            return "utf-16-be", "strict", digest.hexdigest(), warnings, size
        raise IngestError("this is not a text file (it contains binary data); upload CSV, JSONL or plain text")
    if utf8_ok:
        return "utf-8", "strict", digest.hexdigest(), warnings, size
    # Not valid UTF-8. UTF-8 carrying CESU-8 surrogate pairs (seen in SNIPS) decodes with
    # surrogatepass; clean_text joins the pairs.
    try:
        with open(path, encoding="utf-8", errors="surrogatepass") as f:
            while f.read(_CHUNK):
                pass
        utf8_cesu = True
    except UnicodeDecodeError:
        pass
    if utf8_cesu:
        warnings.append({"line": None, "reason": "UTF-8 with CESU-8 encoded characters (surrogate pairs); joined"})
        return "utf-8", "surrogatepass", digest.hexdigest(), warnings, size
    from charset_normalizer import from_path

    results = from_path(path)
    best = results.best()
    if best is None:
        raise IngestError("the file's character encoding could not be detected (is it a text file?)")
    encoding = best.encoding
    # Short texts in Western languages decode almost alike under several single-byte code
    # pages (cp1250/cp1252/cp1257 differ in a few letters) and charset-normalizer's ranking
    # among them is noisy; when it also finds Windows-1252 plausible (little more "chaos"),
    # prefer it: it is what Excel and most Windows tools write.
    if _single_byte(encoding):
        for m in results:
            if m.encoding == "cp1252" and m.percent_chaos <= best.percent_chaos + 10.0:
                encoding = "cp1252"
                break
    if encoding in ("utf_8", "utf-8"):
        warnings.append({"line": None, "reason": "some bytes are not valid UTF-8; replaced with U+FFFD"})
        return "utf-8", "replace", digest.hexdigest(), warnings, size
    return encoding, "strict", digest.hexdigest(), warnings, size


def _single_byte(encoding: str) -> bool:
    return encoding.startswith(("cp12", "cp8", "cp7", "iso8859", "latin", "mac_", "windows"))


def _kind_for(filename: str, sample: str) -> str:
    name = filename.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                      (".tsv", "csv"), (".tab", "csv"), (".txt", "text"), (".text", "text")):
        if name.endswith(ext):
            if kind == "json" and sample.lstrip().startswith("{") and "\n{" in sample.strip():
                return "jsonl"  # a .json file holding one object per line
            return kind
    stripped = sample.lstrip()
    if stripped.startswith("{"):
        return "jsonl"
    if stripped.startswith("["):
        return "json"
    first = stripped.splitlines()[0] if stripped else ""
    if "\t" in first or "," in first:
        return "csv"
    return "text"


def sniff_file(path: str | Path, filename: str = "") -> FileFormat:
    """Detect the encoding (BOM, strict UTF-8, else charset-normalizer) and the format (by
    extension, else by content) of ``path``. Raises IngestError for an empty or binary file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_SAMPLE_BYTES)
    encoding, errors, sha, warnings, size = _detect_encoding(path, head)
    sample = head.decode(encoding, errors="replace" if errors == "strict" else errors)
    sample = sample.lstrip("\ufeff")
    if not sample.strip():
        raise IngestError("the file has no text (only blank lines)")
    kind = _kind_for(filename or path.name, sample)
    fmt = FileFormat(kind=kind, encoding=encoding, errors=errors, size_bytes=size, sha256=sha, warnings=warnings)
    if kind == "csv":
        lines = sample.splitlines()
        first = lines[0] if lines else ""
        m = re.fullmatch(r'"?sep=(.)"?,*', first.strip())
        if m:
            fmt.delimiter, fmt.skip_first_line = m.group(1), True
            first = lines[1] if len(lines) > 1 else ""
        elif (filename or path.name).lower().endswith((".tsv", ".tab")):
            fmt.delimiter = "\t"
        else:
            counts = {d: first.count(d) for d in (",", "\t", ";", "|")}
            fmt.delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
        if fmt.delimiter == "\t":
            # Tab-separated files are often written without quoting (a text may begin with a
            # quote mark); treat quotes as text unless the fields are quoted the Excel way.
            # A quoted field must close right before a tab or the line end; one that closes
            # and goes on (``"Gimme a few" was``) means quotes are plain text here.
            quoted = [c for ln in lines[:2000] for c in ln.split("\t") if c.startswith('"')]
            closed = [re.match(r'"(?:[^"]|"")*"', c) for c in quoted]
            if not quoted or any(m is not None and m.end() != len(c) for m, c in zip(closed, quoted)):
                fmt.quoting = csv.QUOTE_NONE
    return fmt


# --- parsers --------------------------------------------------------------------------------


def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in value]
        return "".join(parts)
    return json.dumps(value, ensure_ascii=False)


def _looks_like_header(rows: list[list[str]]) -> bool:
    """A first row is a header when its cells are non-empty, distinct, short, and none of them
    recurs as a value of its column in the following rows."""
    if not rows:
        return False
    head = [c.strip() for c in rows[0]]
    if not head or any(not c or len(c) > 100 for c in head) or len(set(head)) != len(head):
        return False
    if any(c.casefold() in TEXT_COLUMN_NAMES + REFERENCE_COLUMN_NAMES for c in head):
        return True
    for row in rows[1:]:
        for i, c in enumerate(row[: len(head)]):
            if c.strip() == head[i]:
                return False
    return True


def _resolve_column(name: str | None, columns: list[str], option: str) -> int | None:
    if name is None or name == "":
        return None
    lowered = [c.casefold() for c in columns]
    if name.casefold() in lowered:
        return lowered.index(name.casefold())
    if name.isdigit() and 1 <= int(name) <= len(columns):
        return int(name) - 1
    raise IngestError(f"{option}: no column {name!r}; the columns are {', '.join(repr(c) for c in columns)}")


@dataclass
class ColumnChoice:
    """The columns a CSV import uses (names as in the header, or ``column_N`` without one)."""

    columns: list[str]
    text: str
    reference: str | None
    header: bool


def _csv_rows(fmt: FileFormat, path: Path, *, text_column, reference_column, header, on_columns, progress) -> Iterator:
    csv.field_size_limit(1 << 30)
    with open(path, encoding=fmt.encoding, errors=fmt.errors, newline="") as f:
        size = max(fmt.size_bytes, 1)
        line_offset = 0
        if fmt.skip_first_line:
            f.readline()
            line_offset = 1
        reader = csv.reader(f, delimiter=fmt.delimiter, quoting=fmt.quoting, strict=False)
        prev_line = 0
        buffered: list[tuple[int, list[str]]] = []
        # Read up to 200 rows to decide on the header and the default text column.
        for row in reader:
            start = prev_line + 1
            prev_line = reader.line_num
            buffered.append((start + line_offset, row))
            if len(buffered) >= 200:
                break
        nonblank = [(ln, r) for ln, r in buffered if any(c.strip() for c in r)]
        if not nonblank:
            raise IngestError("the file has no rows (only blank lines)")
        if nonblank[0][1] and nonblank[0][1][0].startswith("\ufeff"):
            nonblank[0][1][0] = nonblank[0][1][0].lstrip("\ufeff")
        has_header = header if header is not None else _looks_like_header([r for _, r in nonblank])
        if has_header:
            columns = [c.strip() or f"column_{i + 1}" for i, c in enumerate(nonblank[0][1])]
            header_line = nonblank[0][0]
        else:
            width = max(len(r) for _, r in nonblank)
            columns = [f"column_{i + 1}" for i in range(width)]
            header_line = 0
        ti = _resolve_column(text_column, columns, "text column")
        if ti is None:
            lowered = [c.casefold() for c in columns]
            for n in TEXT_COLUMN_NAMES:
                if n in lowered:
                    ti = lowered.index(n)
                    break
        if ti is None:
            if has_header or len(columns) == 1:
                ti = 0
            else:  # no header: the column with the longest texts
                data = [r for _, r in nonblank]
                ti = max(range(len(columns)), key=lambda i: sum(len(r[i]) for r in data if i < len(r)))
        ri = _resolve_column(reference_column, columns, "reference column")
        if ri is None and reference_column is None and has_header:
            lowered = [c.casefold() for c in columns]
            for n in REFERENCE_COLUMN_NAMES:
                if n in lowered and lowered.index(n) != ti:
                    ri = lowered.index(n)
                    break
        if ri == ti:
            raise IngestError(f"the reference column {columns[ri]!r} is also the text column")
        on_columns(ColumnChoice(columns=columns, text=columns[ti], reference=columns[ri] if ri is not None else None, header=has_header))

        def convert(line: int, row: list[str]):
            if not any(c.strip() for c in row):
                return SkippedRow(line, "empty")
            if ti >= len(row):
                return SkippedRow(line, f"missing column: {columns[ti]!r} (row has {len(row)} field{'s' if len(row) != 1 else ''})")
            text = clean_text(row[ti])
            if not text:
                return SkippedRow(line, f"empty: no text in column {columns[ti]!r}")
            if len(text) > MAX_QUERY_CHARS:
                return SkippedRow(line, f"too long: {len(text)} characters (max {MAX_QUERY_CHARS})")
            ref = None
            if ri is not None:
                if ri >= len(row):
                    return SkippedRow(line, f"missing column: {columns[ri]!r} (row has {len(row)} fields)")
                ref = clean_text(row[ri]) or None
            meta = {}
            for i, c in enumerate(row):
                if i != ti and i != ri:
                    key = columns[i] if i < len(columns) else f"column_{i + 1}"
                    meta[key] = clean_text(c)
            return ParsedRow(line, text, ref, meta)

        for ln, row in buffered:
            if has_header and ln == header_line:
                continue
            if has_header and ln < header_line:
                yield SkippedRow(ln, "empty")
                continue
            yield convert(ln, row)
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                start = prev_line + 1
                prev_line = reader.line_num
                yield SkippedRow(start + line_offset, f"malformed CSV: {exc}")
                continue
            start = prev_line + 1
            prev_line = reader.line_num
            yield convert(start + line_offset, row)
            n += 1
            if progress is not None and n % 2000 == 0:
                progress(_pos(f) / size)


def _pos(f) -> float:
    try:
        return float(f.buffer.tell())
    except (OSError, ValueError, AttributeError):
        return 0.0


def _clean_value(value):
    """``clean_text`` applied to every string inside a JSON value (keys included)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    return value


def _json_row(line: int, obj, *, text_column, reference_column) -> ParsedRow | SkippedRow:
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        return SkippedRow(line, f"malformed row: expected a JSON object, got {type(obj).__name__}")
    meta = dict(obj)
    ref = None
    if text_column:
        if text_column not in obj:
            return SkippedRow(line, f"missing column: no {text_column!r} key")
        text = _as_text(meta.pop(text_column))
    elif "query" in obj:
        text = _as_text(meta.pop("query"))
    elif "text" in obj:
        text = _as_text(meta.pop("text"))
    elif isinstance(obj.get("messages"), list):
        messages = meta.pop("messages")
        text, last_user = None, -1
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                text, last_user = _as_text(m.get("content")), i
        if text is None:
            return SkippedRow(line, "missing column: 'messages' has no user message")
        answers = [m for m in messages[last_user + 1:] if isinstance(m, dict) and m.get("role") == "assistant"]
        if not answers:
            answers = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if answers:
            ref = _as_text(answers[0].get("content"))
        system = [_as_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        if system:
            meta["system"] = system[0]
    elif isinstance(obj.get("data"), list) and all(isinstance(s, dict) and "text" in s for s in obj["data"]):
        # SNIPS NLU style: the text is the concatenation of segments; slots become metadata.
        segments = meta.pop("data")
        text = "".join(str(s["text"]) for s in segments)
        meta["slots"] = [{"entity": s["entity"], "text": s["text"]} for s in segments if s.get("entity")]
    else:
        return SkippedRow(line, "missing column: no 'query', 'text' or 'messages' key")
    if reference_column:
        if reference_column in obj:
            ref = _as_text(meta.pop(reference_column))
    elif ref is None:
        for k in ("reference", "answer", "label"):
            if k in obj:
                ref = _as_text(meta.pop(k))
                break
    text = clean_text(text or "")
    if not text:
        return SkippedRow(line, "empty")
    meta = _clean_value(meta)
    if len(text) > MAX_QUERY_CHARS:
        return SkippedRow(line, f"too long: {len(text)} characters (max {MAX_QUERY_CHARS})")
    if ref is not None:
        ref = clean_text(ref) or None
    return ParsedRow(line, text, ref, meta)


def _jsonl_rows(fmt, path, *, text_column, reference_column, progress) -> Iterator:
    with open(path, encoding=fmt.encoding, errors=fmt.errors, newline=None) as f:
        size = max(fmt.size_bytes, 1)
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.lstrip("\ufeff")
            if not raw.strip():
                yield SkippedRow(n, "empty")
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield SkippedRow(n, f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            except RecursionError:
                yield SkippedRow(n, _TOO_DEEP)
                continue
            if not openers_at_most(raw) and json_depth(obj, stop_after=MAX_DEPTH) > MAX_DEPTH:
                yield SkippedRow(n, _TOO_DEEP)
                continue
            yield _json_row(n, obj, text_column=text_column, reference_column=reference_column)
            if progress is not None and n % 2000 == 0:
                progress(_pos(f) / size)


def _json_rows(fmt, path, *, text_column, reference_column) -> Iterator:
    """A JSON document: a list of rows, or an object of named lists of rows (the name is kept
    as ``metadata["group"]``, as in SNIPS' ``{"GetWeather": [...]}``). Line numbers are those
    of each row's opening brace."""
    text = Path(path).read_bytes().decode(fmt.encoding, errors=fmt.errors).lstrip("\ufeff")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise IngestError(f"malformed JSON: nested too deeply (rows may nest at most {MAX_DEPTH} levels)") from None
    groups: list[tuple[str | None, list]] = []
    if isinstance(doc, list):
        groups.append((None, doc))
    elif isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        groups.extend(doc.items())
    else:
        raise IngestError("a JSON file must hold a list of rows (or an object of named lists of rows); use JSONL for one object per line")
    # Line of each row: scan for the start of each top-level row object with a raw decoder.
    decoder = json.JSONDecoder()
    line_starts = _row_lines(text, decoder)
    k = 0
    for group, rows in groups:
        for obj in rows:
            line = line_starts[k] if k < len(line_starts) else 0
            k += 1
            if json_depth(obj, stop_after=MAX_DEPTH) > MAX_DEPTH:
                yield SkippedRow(line, _TOO_DEEP)
                continue
            row = _json_row(line, obj, text_column=text_column, reference_column=reference_column)
            if isinstance(row, ParsedRow) and group is not None:
                row.metadata.setdefault("group", group)
                if row.reference is None and reference_column is None:
                    row = ParsedRow(row.line, row.text, group, row.metadata)
            yield row


def _row_lines(text: str, decoder: json.JSONDecoder) -> list[int]:
    """1-based line of every element of the top-level list(s) in a JSON document."""
    lines: list[int] = []
    i = 0
    n = len(text)

    def skip_ws(j):
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_ws(i)
    arrays: list[int] = []
    if i < n and text[i] == "[":
        arrays.append(i)
    elif i < n and text[i] == "{":
        j = i + 1
        while True:
            j = skip_ws(j)
            if j >= n or text[j] == "}":
                break
            _, j = decoder.raw_decode(text, j)  # the key
            j = skip_ws(j)
            j += 1  # ':'
            j = skip_ws(j)
            arrays.append(j)
            _, j = decoder.raw_decode(text, j)
            j = skip_ws(j)
            if j < n and text[j] == ",":
                j += 1
    for a in arrays:
        j = skip_ws(a + 1)
        while j < n and text[j] != "]":
            lines.append(text.count("\n", 0, j) + 1 if "\n" in text else 1)
            _, j = decoder.raw_decode(text, j)
            j = skip_ws(j)
            if j < n and text[j] == ",":
                j = skip_ws(j + 1)
    return lines


def _text_rows(fmt, path, *, progress) -> Iterator:
    with open(path, encoding=fmt.encoding, errors=fmt.errors, newline=None) as f:
        size = max(fmt.size_bytes, 1)
        for n, raw in enumerate(f, 1):
            text = clean_text(raw)
            if not text:
                yield SkippedRow(n, "empty")
            elif len(text) > MAX_QUERY_CHARS:
                yield SkippedRow(n, f"too long: {len(text)} characters (max {MAX_QUERY_CHARS})")
            else:
                yield ParsedRow(n, text)
            if progress is not None and n % 2000 == 0:
                progress(_pos(f) / size)


def read_rows(
    path: str | Path,
    fmt: FileFormat,
    *,
    text_column: str | None = None,
    reference_column: str | None = None,
    header: bool | None = None,
    on_columns: Callable[[ColumnChoice], None] | None = None,
    progress: Callable[[float], None] | None = None,
) -> Iterator[ParsedRow | SkippedRow]:
    """Stream the rows of ``path`` (format from ``sniff_file``) as ParsedRow / SkippedRow.

    CSV: ``text_column`` / ``reference_column`` name a header column (case-insensitive) or give
    its 1-based number; by default the text column is the first named like text, query,
    question, message or sentence, else the first column (without a header row: the column with
    the longest texts); the reference column is one named like reference, answer, label,
    category or intent. ``header`` forces (True/False) the header detection. Other columns go
    to ``metadata``. JSONL / JSON: ``query`` or ``text`` (or ``text_column``), optional
    ``reference`` (or ``answer``, ``label``, ``reference_column``), or OpenAI chat ``messages``
    (the last user message is the text, the assistant answer after it the reference).
    ``on_columns`` is called once with the CSV column choice; ``progress`` with a fraction of
    bytes read. Raises IngestError for a file that cannot be read (unknown column, ...)."""
    path = Path(path)
    on_columns = on_columns or (lambda choice: None)
    if fmt.kind == "csv":
        yield from _csv_rows(fmt, path, text_column=text_column, reference_column=reference_column,
                             header=header, on_columns=on_columns, progress=progress)
    elif fmt.kind == "jsonl":
        yield from _jsonl_rows(fmt, path, text_column=text_column, reference_column=reference_column, progress=progress)
    elif fmt.kind == "json":
        yield from _json_rows(fmt, path, text_column=text_column, reference_column=reference_column)
    else:
        yield from _text_rows(fmt, path, progress=progress)


__all__ = [
    "MAX_QUERY_CHARS", "IngestError", "ParsedRow", "SkippedRow", "FileFormat", "ColumnChoice",
    "clean_text", "normalise_text", "text_hash", "split_for_hash", "sniff_file", "read_rows",
]
