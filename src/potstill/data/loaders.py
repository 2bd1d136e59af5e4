"""Load records (one dict per example) from data files, built-in datasets and Hugging Face dataset ids.

Every problem with the user's data is a `UserError` that names the file, the line (text formats; 1-based
physical line, the CSV/TSV header being line 1) or the row index (parquet, `datasets` folders), and what
was expected. Loading stops at the first malformed record.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from potstill.errors import UserError, did_you_mean
from potstill.hub import load_hub_dataset, looks_like_hub_id

SUPPORTED_FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
BUILTIN_DATASETS = ("digits", "bbc", "bbc-sentences", "bbc-continuations", "lee", "chatterbot", "general")
BUILTIN_SPLITS = ("train", "validation", "test")
BUILTIN_PREFIX = "builtin:"
SPLIT_SEED = 0
MIN_PARAGRAPH_CHARS = 40

# A raw record with where it came from ("line 7", "row 3").
_Located = tuple[str, Any]


# ----------------------------------------------------------------------------------------------- readers


def _invalid_json(name: str, line: int, err: json.JSONDecodeError) -> UserError:
    return UserError(f"{name}, line {line}: invalid JSON ({err.msg}: column {err.colno})")


def _not_an_object(name: str, where: str, value: Any) -> UserError:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    kind = kinds.get(type(value), "a number")
    return UserError(f"{name}, {where}: expected a JSON object ({{...}}) per record, got {kind}")


def _read_json_lines(path: Path, name: str, text: str | None = None) -> Iterator[_Located]:
    if text is None:
        text = path.read_text(encoding="utf-8-sig")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise _invalid_json(name, lineno, err) from None
        yield f"line {lineno}", value


def _read_json(path: Path, name: str) -> Iterator[_Located]:
    """A JSON array of objects (each element located by the line it starts on), else JSON lines."""
    text = path.read_text(encoding="utf-8-sig")
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] != "[":
        yield from _read_json_lines(path, name, text)
        return
    decoder = json.JSONDecoder()
    pos = start + 1

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, msg: str) -> UserError:
        return _invalid_json(name, text.count("\n", 0, i) + 1, json.JSONDecodeError(msg, text, i))

    pos = skip_ws(pos)
    if text[pos : pos + 1] == "]":
        pos = skip_ws(pos + 1)
        if pos != len(text):
            raise fail(pos, "Extra data")
        return
    while True:
        pos = skip_ws(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _invalid_json(name, err.lineno, err) from None
        yield f"line {text.count(chr(10), 0, pos) + 1}", value
        pos = skip_ws(end)
        sep = text[pos : pos + 1]
        if sep == ",":
            pos += 1
        elif sep == "]":
            pos = skip_ws(pos + 1)
            if pos != len(text):
                raise fail(pos, "Extra data")
            return
        elif not sep:
            raise fail(pos, "Expecting ',' delimiter or ']' (the array is not closed)")
        else:
            raise fail(pos, "Expecting ',' delimiter")


def _read_delimited(path: Path, name: str, delimiter: str) -> Iterator[_Located]:
    # TSV is read without quote handling (fields hold no tabs or newlines), as most NLP TSVs contain raw
    # quotes in text; CSV follows RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            seen: set[str] = set()
            for i, column in enumerate(header, start=1):
                if not column:
                    raise UserError(f"{name}, line 1: header column {i} has no name")
                if column in seen:
                    raise UserError(f'{name}, line 1: header names column "{column}" twice')
                seen.add(column)
            last_line = reader.line_num
            for row in reader:
                lineno = last_line + 1
                last_line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                    continue  # blank line
                if len(row) != len(header):
                    raise UserError(
                        f"{name}, line {lineno}: expected {len(header)} fields ({', '.join(header)}), "
                        f"got {len(row)}"
                    )
                yield f"line {lineno}", dict(zip(header, row, strict=True))
        except csv.Error as err:
            fmt = path.suffix[1:].upper()
            raise UserError(f"{name}, line {reader.line_num}: malformed {fmt} ({err})") from None


def _read_parquet(path: Path, name: str) -> Iterator[_Located]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise UserError(f"{name}: not a readable parquet file ({err})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def _read_saved_dataset(path: Path, name: str, split: str | None) -> Iterator[_Located]:
    if not (
        (path / "dataset_dict.json").exists()
        or (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
    ):
        raise UserError(
            f"{name} is a folder but not a dataset written by datasets' save_to_disk "
            f"(expected dataset_dict.json or state.json in it); "
            f"supported files: {', '.join(SUPPORTED_FORMATS)}"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{name}: could not load the saved dataset ({err})") from None
    return _dataset_rows(loaded, name, split)


def _dataset_rows(loaded: Any, name: str, split: str | None) -> Iterator[_Located]:
    """The rows of a `datasets` Dataset, or of the `split` of a DatasetDict (required when it holds several)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict) and split is None and len(loaded) == 1:
        split = next(iter(loaded))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if split is None:
            raise UserError(
                f"{name} holds several splits; choose one with split=... (splits: {', '.join(splits)})"
            )
        if split not in loaded:
            raise UserError(
                f'{name} has no split "{split}"{did_you_mean(split, splits)}; splits: {", ".join(splits)}'
            )
        loaded = loaded[split]
    for i, row in enumerate(loaded):
        yield f"row {i}", row


def _raw_records(path: Path, name: str, split: str | None) -> Iterator[_Located]:
    if path.is_dir():
        return _read_saved_dataset(path, name, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path, name)
    if suffix == ".json":
        return _read_json(path, name)
    if suffix == ".csv":
        return _read_delimited(path, name, ",")
    if suffix == ".tsv":
        return _read_delimited(path, name, "\t")
    if suffix == ".parquet":
        return _read_parquet(path, name)
    raise UserError(
        f'{name}: unsupported data format "{suffix or path.name}"; '
        f"supported: {', '.join(SUPPORTED_FORMATS)}, or a folder written by datasets' save_to_disk"
    )


# ---------------------------------------------------------------------------------------------- records


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def _records(
    located: Iterator[_Located],
    name: str,
    *,
    columns: dict[str, str] | None,
    required: Sequence[str],
    limit: int | None,
) -> list[dict]:
    columns = dict(columns or {})
    for canonical, source in columns.items():
        if not isinstance(canonical, str) or not isinstance(source, str):
            raise UserError(
                f"columns must map field names to column names (strings), got {canonical!r}: {source!r}"
            )
    if isinstance(required, str):
        required = (required,)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise UserError(f"limit must be a whole number >= 0, got {limit!r}")
    source_to_canonical = {source: canonical for canonical, source in columns.items()}
    mapped_seen: set[str] = set()
    all_columns: set[str] = set()

    out: list[dict] = []
    if limit == 0:
        return out
    for where, raw in located:
        if not isinstance(raw, dict):
            raise _not_an_object(name, where, raw)
        all_columns.update(raw)
        record: dict = {}
        renamed: dict = {}
        for key, value in raw.items():
            if key in source_to_canonical:
                renamed[source_to_canonical[key]] = value
                mapped_seen.add(key)
            else:
                record[key] = value
        record.update(renamed)  # a mapped column wins over an unmapped one of the same name
        for field in required:
            source = columns.get(field, field)
            if field not in record:
                have = ", ".join(f'"{k}"' for k in raw) or "none"
                via = f' (read from column "{source}")' if source != field else ""
                raise UserError(
                    f'{name}, {where}: missing required field "{field}"{via}'
                    f"{did_you_mean(source, list(raw))}; this record has fields: {have}"
                )
            if _is_empty(record[field]):
                raise UserError(f'{name}, {where}: required field "{field}" is empty (null or blank)')
        out.append(record)
        if limit is not None and len(out) >= limit:
            break  # later rows are not read
    if not out:
        raise UserError(f"{name}: no records (the data is empty)")
    for canonical, source in columns.items():
        if source not in mapped_seen:
            raise UserError(
                f'{name}: column "{source}" (mapped to "{canonical}") is not in the data'
                f"{did_you_mean(source, all_columns)}; columns: {', '.join(sorted(all_columns))}"
            )
    return out


def load_records(
    path: str | os.PathLike,
    *,
    columns: dict[str, str] | None = None,
    required: Sequence[str] = (),
    split: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Read a data file (.jsonl/.ndjson/.json/.csv/.tsv/.parquet) or a `save_to_disk` folder into records.

    `columns` maps canonical field name -> source column name; records use the canonical names (other
    columns are kept as they are). `required` canonical fields must be present and non-empty in every record.
    `split` picks the split of a saved DatasetDict. `limit` keeps the first `limit` records.
    CSV/TSV values stay strings.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    name = str(path)
    try:
        return _records(_raw_records(path, name, split), name, columns=columns, required=required, limit=limit)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> UserError:
    """The decoding error as a UserError naming the file and the first bad byte's offset in it (a reader that
    decodes in chunks reports an offset within its chunk, so the file is decoded once more to find it)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        start = exc.start
    except UnicodeDecodeError as whole:
        start = whole.start
    byte = f"byte 0x{data[start]:02x} at offset {start}" if start < len(data) else f"offset {start}"
    return UserError(f"{path}: not UTF-8 text ({byte}); save the file as UTF-8")


def fingerprint_records(records: list[dict]) -> str:
    """A stable sha256 hex digest of `records` (key order does not matter)."""
    h = hashlib.sha256()
    for record in records:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- built-ins


def _split_indices(labels: tuple, split: str) -> list[int]:
    """Fixed stratified 70/10/20 train/validation/test split of range(len(labels)), seed 0."""
    return list(_split_table(labels)[split])


@functools.lru_cache(maxsize=8)
def _split_table(labels: tuple) -> dict[str, tuple[int, ...]]:
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    rest, test = train_test_split(idx, test_size=0.2, stratify=list(labels), random_state=SPLIT_SEED)
    train, validation = train_test_split(
        rest, test_size=0.125, stratify=[labels[i] for i in rest], random_state=SPLIT_SEED
    )
    return {"train": tuple(train), "validation": tuple(validation), "test": tuple(test)}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[tuple[tuple[float, ...], ...], tuple[int, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = tuple(tuple(float(v) / 16.0 for v in row) for row in bunch.data)
    return features, tuple(int(y) for y in bunch.target)


def _paragraphs(text: str) -> list[str]:
    """The body paragraphs of a BBC article (title line dropped), at least MIN_PARAGRAPH_CHARS long."""
    body = text.replace("\r\n", "\n").split("\n", 1)[1] if "\n" in text else ""
    paragraphs = (" ".join(p.split()) for p in body.split("\n\n"))
    return [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS]


def _check_split(name: str, split: str) -> None:
    if split not in BUILTIN_SPLITS:
        raise UserError(
            f'builtin:{name} has no split "{split}"{did_you_mean(str(split), BUILTIN_SPLITS)}; '
            f"splits: {', '.join(BUILTIN_SPLITS)}"
        )


def builtin_records(name: str, split: str) -> list[dict]:
    """Records of a built-in dataset: digits, bbc, bbc-sentences, bbc-continuations, chatterbot, general
    (train/validation/test), lee (no splits).

    Splits are a fixed stratified 70/10/20 split (seed 0), in shuffled order. "bbc" holds the 2,127 distinct
    articles of BBC News (its 98 duplicated articles once each); "bbc-sentences" splits the same articles
    into paragraphs of at least 40 characters (title dropped); "bbc-continuations" turns the same articles (title
    dropped) into `prompt`, `chosen`, `rejected` preference pairs (`potstill.data.preference.continuation_pairs`,
    rejected spans from the same split, seeded by the split; a prompt already in an earlier split is dropped: BBC
    News holds a few near-copies). "chatterbot" holds the English chatterbot
    corpus's question → answer pairs as `query`, `positive` and `topic` (a plain seeded split). "general"
    holds general-domain sentences and short passages as `text` and `source` (`potstill.data.general`).
    """
    if name not in BUILTIN_DATASETS:
        raise UserError(
            f'unknown built-in dataset "{name}"{did_you_mean(str(name), BUILTIN_DATASETS)}; '
            f"built-in datasets: {', '.join(BUILTIN_DATASETS)}"
        )
    if name == "lee":
        from potstill.assets import lee_corpus

        return [{"text": doc} for doc in lee_corpus()[0]]
    _check_split(name, split)
    if name == "general":
        from potstill.data.general import general_records

        return general_records(split, [r["text"] for r in builtin_records("bbc-sentences", "train")])
    if name == "chatterbot":
        from potstill.assets import chatterbot_pairs

        pairs = chatterbot_pairs()
        labels = ("all",) * len(pairs)  # a plain seeded split: some topic files hold a single conversation
        return [{"query": pairs[i][0], "positive": pairs[i][1], "topic": pairs[i][2]}
                for i in _split_indices(labels, split)]
    if name == "digits":
        features, labels = _digits()
        return [{"features": list(features[i]), "label": labels[i]} for i in _split_indices(labels, split)]

    from potstill.assets import bbc_news

    # BBC News holds 98 articles twice (same text, same topic); keep one copy so no text is in two splits.
    articles = list(dict.fromkeys(bbc_news()))
    labels = tuple(topic for _, topic in articles)
    chosen = [articles[i] for i in _split_indices(labels, split)]
    if name == "bbc":
        return [{"text": text, "label": topic} for text, topic in chosen]
    if name == "bbc-continuations":
        # BBC News holds a few near-copies (same lead, other body): a prompt of an earlier split is not held out
        earlier = BUILTIN_SPLITS[:BUILTIN_SPLITS.index(split)]
        seen = {r["prompt"] for s in earlier for r in _bbc_continuations(articles, labels, s)}
        return [r for r in _bbc_continuations(articles, labels, split) if r["prompt"] not in seen]
    return [{"text": p, "label": topic} for text, topic in chosen for p in _paragraphs(text)]


def _bbc_continuations(articles: list[tuple[str, str]], labels: tuple, split: str) -> list[dict]:
    """Preference pairs from one split's BBC articles (title dropped), before the cross-split de-duplication."""
    from potstill.data.preference import continuation_pairs

    bodies = [" ".join(articles[i][0].split("\n", 1)[-1].split()) for i in _split_indices(labels, split)]
    return continuation_pairs(bodies, seed=f"bbc-continuations-{split}")


def load_source(
    source: str,
    *,
    columns: dict[str, str] | None = None,
    required: Sequence[str] = (),
    split: str | None = None,
    limit: int | None = None,
    base_dir: str | os.PathLike | None = None,
    field: str = "data path",
) -> list[dict]:
    """`builtin:<name>` (split defaults to "train"), a data path (relative to `base_dir` if relative), or a Hugging
    Face dataset id (`org/name`, read through the datasets / hub cache, `potstill.hub`; a missing cached id is
    an error naming `field`)."""
    source = str(source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :].strip()
        records = builtin_records(name, split or "train")
        located = ((f"row {i}", r) for i, r in enumerate(records))
        return _records(located, source, columns=columns, required=required, limit=limit)
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists() and looks_like_hub_id(source, dataset=True):
        loaded = load_hub_dataset(source, split=split, field=field)
        return _records(_dataset_rows(loaded, source, split), source, columns=columns, required=required,
                        limit=limit)
    return load_records(path, columns=columns, required=required, split=split, limit=limit)
