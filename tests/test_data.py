"""Data loading: every format, column mapping, required fields, error messages, built-in datasets."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from potstill.data import builtin_records, fingerprint_records, load_records, load_source
from potstill.errors import UserError

ROWS = [
    {"sentence": "good film", "y": 1},
    {"sentence": "bad film", "y": 0},
    {"sentence": "fine, I guess", "y": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_delimited(path, rows, delimiter):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    return str(info.value)


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_jsonl_round_trip(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))
    assert load_records(path) == ROWS


def test_json_array_and_json_lines(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    assert load_records(array) == ROWS
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_records(lines) == ROWS
    empty_array = tmp_path / "empty.json"
    empty_array.write_text("[]")
    assert "no records" in error(load_records, empty_array)


def test_csv_and_tsv_round_trip(tmp_path):
    rows = [{"sentence": r["sentence"], "y": str(r["y"])} for r in ROWS]  # CSV values stay strings
    assert load_records(write_delimited(tmp_path / "d.csv", rows, ",")) == rows
    assert load_records(write_delimited(tmp_path / "d.tsv", rows, "\t")) == rows


def test_csv_quoted_multiline_and_tsv_raw_quotes(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"line one\nline two, with comma",1\n\nplain,0\n')
    assert load_records(path) == [
        {"text": "line one\nline two, with comma", "label": "1"},
        {"text": "plain", "label": "0"},
    ]
    tsv = tmp_path / "q.tsv"
    tsv.write_text('text\tlabel\nhe said "hi" to me\t1\n')
    assert load_records(tsv) == [{"text": 'he said "hi" to me', "label": "1"}]


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_records(path) == ROWS


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_records(tmp_path / "one") == ROWS
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", split="test") == ROWS[:1]
    assert load_records(tmp_path / "dd", split="train", limit=2) == ROWS[:2]
    msg = error(load_records, tmp_path / "dd", split="tset")
    assert "dd" in msg and 'no split "tset"' in msg and 'did you mean "test"' in msg and "train" in msg
    msg = error(load_records, tmp_path / "dd")
    assert "splits: train, test" in msg


def test_saved_dataset_row_index_in_errors(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": None}]).save_to_disk(str(tmp_path / "ds"))
    msg = error(load_records, tmp_path / "ds", required=["text"])
    assert "row 1" in msg and "empty" in msg


def test_plain_folder_is_rejected(tmp_path):
    (tmp_path / "folder").mkdir()
    assert "save_to_disk" in error(load_records, tmp_path / "folder")


# ------------------------------------------------------------------------------- columns and required


def test_column_mapping_and_required(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**r, "id": i} for i, r in enumerate(ROWS)])
    records = load_records(path, columns={"text": "sentence", "label": "y"}, required=["text", "label"])
    assert records[0] == {"text": "good film", "label": 1, "id": 0}
    assert [r["label"] for r in records] == [1, 0, 1]


def test_mapped_column_wins_over_same_named_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "old", "sentence": "new"}])
    assert load_records(path, columns={"text": "sentence"}) == [{"text": "new"}]


def test_mapped_column_absent_everywhere(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = error(load_records, path, columns={"label": "yy"})
    assert "d.jsonl" in msg and '"yy"' in msg and 'did you mean "y"' in msg


def test_missing_required_field_with_hint(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1}, {"txt": "b", "label": 0}])
    msg = error(load_records, path, required=["text", "label"])
    assert "data.jsonl, line 2" in msg
    assert 'missing required field "text"' in msg
    assert '"txt", "label"' in msg and 'did you mean "txt"' in msg


def test_missing_mapped_field_names_source_column(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"sentense": "a"}])
    msg = error(load_records, path, columns={"text": "sentence"}, required=["text"])
    assert 'line 1: missing required field "text" (read from column "sentence")' in msg
    assert 'did you mean "sentense"' in msg


@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_required_value(tmp_path, value):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, {"text": value}])
    msg = error(load_records, path, required=["text"])
    assert "data.jsonl, line 3" in msg and 'required field "text" is empty' in msg


def test_empty_required_value_csv_line_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,1\n\n,0\n")
    msg = error(load_records, path, required=["text"])
    assert "d.csv, line 4" in msg and "empty" in msg


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,1\nworld,0,extra\n")
    msg = error(load_records, path)
    assert "d.csv, line 3" in msg and "expected 2 fields" in msg


def test_parquet_row_index(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}, {"text": None}]), path)
    msg = error(load_records, path, required=["text"])
    assert "d.parquet, row 2" in msg


# ---------------------------------------------------------------------------------------- errors


def test_invalid_json_line_3(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "label": 1}\n{"text": "d"}\n')
    msg = error(load_records, path)
    assert "data.jsonl, line 3: invalid JSON (Expecting ',' delimiter: column 14)" in msg


def test_invalid_json_in_array_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert "data.json, line 3: invalid JSON" in error(load_records, path)
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n')
    assert "data.json, line 3: invalid JSON (Expecting ',' delimiter" in error(load_records, path)
    path.write_text('[\n  {"text": "a"},\n  3\n]\n')
    assert "data.json, line 3: expected a JSON object" in error(load_records, path)


def test_non_object_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    msg = error(load_records, path)
    assert "data.jsonl, line 2: expected a JSON object" in msg and "array" in msg


def test_first_malformed_row_wins(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"label": 1}\n{oops\n')
    assert "line 1: missing required field" in error(load_records, path, required=["text"])


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n\n" if name.endswith("jsonl") else "")
    msg = error(load_records, path)
    assert name in msg and "no records" in msg


def test_header_only_csv_is_empty(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("text,label\n")
    assert "no records" in error(load_records, path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    msg = error(load_records, path)
    assert "data.xlsx" in msg and ".xlsx" in msg and ".jsonl" in msg and ".parquet" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert error(load_records, path) == f"data file not found: {path}"


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_records(path, limit=2) == ROWS[:2]
    assert load_records(path, limit=10) == ROWS
    assert load_records(path, limit=0) == []
    # rows past the limit are not read
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    assert load_records(path, limit=1) == ROWS[:1]
    assert "limit" in error(load_records, path, limit=-1)


# ----------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive():
    a = [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    b = [{"label": 1, "text": "x"}, {"label": 0, "text": "y"}]
    assert fingerprint_records(a) == fingerprint_records(b)
    assert len(fingerprint_records(a)) == 64
    changed = [{"text": "x", "label": 1}, {"text": "y", "label": 1}]
    assert fingerprint_records(a) != fingerprint_records(changed)
    assert fingerprint_records(a) != fingerprint_records(a[::-1])


def test_fingerprint_is_fixed_across_runs():
    # Pinned so that cache manifests stay valid across releases.
    import hashlib

    record = {"b": 2, "a": "é"}
    expected = hashlib.sha256(b'{"a":"\xc3\xa9","b":2}\n').hexdigest()
    assert fingerprint_records([record]) == expected


# -------------------------------------------------------------------------------------- builtins


def test_builtin_digits_split():
    splits = {s: builtin_records("digits", s) for s in ("train", "validation", "test")}
    sizes = {s: len(r) for s, r in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "validation": 180, "test": 360}
    record = splits["train"][0]
    assert set(record) == {"features", "label"} and len(record["features"]) == 64
    assert all(0.0 <= v <= 1.0 for v in record["features"]) and isinstance(record["label"], int)
    keys = {s: {(tuple(r["features"]), r["label"]) for r in recs} for s, recs in splits.items()}
    # the 1,797 digit images are all distinct, so disjoint splits share no record
    assert len(keys["train"] | keys["validation"] | keys["test"]) == 1797
    assert builtin_records("digits", "train") == splits["train"]  # deterministic
    # stratified: every class in every split
    assert all({r["label"] for r in recs} == set(range(10)) for recs in splits.values())


def test_builtin_bbc_and_sentences():
    splits = {s: builtin_records("bbc", s) for s in ("train", "validation", "test")}
    # 2,225 articles, 98 of them twice: each distinct text once, so no text is in two splits
    assert sum(len(r) for r in splits.values()) == 2127
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1488, 213, 426]
    texts = {s: {r["text"] for r in recs} for s, recs in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    assert {r["label"] for r in splits["train"]} == {"business", "entertainment", "politics", "sport", "tech"}
    sentences = builtin_records("bbc-sentences", "test")
    assert len(sentences) > len(splits["test"])
    assert all(len(r["text"]) >= 40 and "\n" not in r["text"] for r in sentences)
    joined = "\n".join(texts["test"])
    assert all(r["text"] in joined or r["text"][:30] in joined for r in sentences[:50])
    titles = {t.split("\n", 1)[0] for t in texts["test"]}
    assert not any(r["text"] in titles for r in sentences)


def test_builtin_lee():
    records = builtin_records("lee", "train")
    assert len(records) == 50 and all(set(r) == {"text"} and r["text"] for r in records)


def test_builtin_unknown_name_and_split():
    msg = error(builtin_records, "digts", "train")
    assert 'did you mean "digits"' in msg
    msg = error(builtin_records, "digits", "valid")
    assert 'did you mean "validation"' in msg


def test_load_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_source("d.jsonl", base_dir=tmp_path, columns={"text": "sentence"})[0]["text"] == "good film"
    assert load_source(str(path), limit=1) == ROWS[:1]
    digits = load_source("builtin:digits", limit=5)
    assert len(digits) == 5 and digits == builtin_records("digits", "train")[:5]
    assert len(load_source("builtin:digits", split="test")) == 360
    renamed = load_source("builtin:digits", split="validation", columns={"x": "features"}, required=["x"])
    assert set(renamed[0]) == {"x", "label"}
    assert 'did you mean "bbc"' in error(load_source, "builtin:bcc")
    assert "data file not found" in error(load_source, "missing.jsonl", base_dir=tmp_path)
