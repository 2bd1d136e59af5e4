"""ScoreFile: precomputed teacher scores read from JSONL / CSV / TSV / triples TSV files (plain or gzip)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
import torch

from potstill.errors import UserError
from potstill.io import sha256_file
from potstill.teachers.score_file import ScoreFile

# one query, three passages; texts with a comma and quotes exercise CSV quoting and unquoted TSV fields
QUERIES = {"7": "what is a cat"}
PASSAGES = {"10": "A cat is a small, furry mammal.", "11": 'Dogs "bark" loudly.', "12": "Paris is in France."}
SCORES = {("7", "10"): 9.5, ("7", "11"): -1.25, ("7", "12"): 0.5}


def _write(path: Path, text: str) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _rows(by_ids: bool) -> list[tuple[str, str, float]]:
    if by_ids:
        return [(q, p, s) for (q, p), s in SCORES.items()]
    return [(QUERIES[q], PASSAGES[p], s) for (q, p), s in SCORES.items()]


def _jsonl(by_ids: bool, int_ids: bool = False) -> str:
    keys = ("query_id", "passage_id") if by_ids else ("query", "passage")
    out = []
    for q, p, s in _rows(by_ids):
        if int_ids:
            q, p = int(q), int(p)
        out.append(json.dumps({keys[0]: q, keys[1]: p, "score": s}))
    return "\n".join(out) + "\n"


def _csv(by_ids: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query_id", "passage_id", "score"] if by_ids else ["query", "passage", "score"])
    w.writerows(_rows(by_ids))
    return buf.getvalue()


def _tsv(by_ids: bool) -> str:
    header = "query_id\tpassage_id\tscore" if by_ids else "query\tpassage\tscore"
    return "\n".join([header] + [f"{q}\t{p}\t{s}" for q, p, s in _rows(by_ids)]) + "\n"


def _triples() -> str:
    # the positive 10 is repeated with the same score, as in the released MS MARCO teacher file
    return "9.5\t-1.25\t7\t10\t11\n9.5\t0.5\t7\t10\t12\n"


FORMATS = {
    "text.jsonl": lambda: _jsonl(False),
    "ids.jsonl": lambda: _jsonl(True),
    "int_ids.json": lambda: _jsonl(True, int_ids=True),
    "text.csv": lambda: _csv(False),
    "ids.csv": lambda: _csv(True),
    "text.tsv": lambda: _tsv(False),
    "ids.tsv": lambda: _tsv(True),
    "triples.tsv": _triples,
    "triples.txt": _triples,
    "no_suffix_jsonl": lambda: _jsonl(False),
}
EXPECTED = torch.tensor([[9.5, -1.25, 0.5]])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_gives_the_same_lookup(tmp_path, name, gz):
    path = _write(tmp_path / (name + (".gz" if gz else "")), FORMATS[name]())
    sf = ScoreFile.load(path)
    assert sf.by_ids == ("ids" in name or "triples" in name)
    assert len(sf) == 3
    if sf.by_ids:
        got = sf.lookup(["7"], [["10", "11", "12"]])
        assert sf.has_pair(7, 10) and sf.has_pair("7", "12") and not sf.has_pair("7", "13")
    else:
        got = sf.lookup([QUERIES["7"]], [[PASSAGES["10"], PASSAGES["11"], PASSAGES["12"]]])
        assert sf.has_pair(QUERIES["7"], PASSAGES["11"]) and not sf.has_pair(QUERIES["7"], "nope")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, EXPECTED)
    assert sf.sha256 == sha256_file(path)


def test_gzip_is_detected_by_content(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_bytes(gzip.compress(_triples().encode()))
    assert len(ScoreFile.load(path)) == 3


def test_lookup_shape_and_order(tmp_path):
    lines = [json.dumps({"query_id": q, "passage_id": p, "score": float(10 * q + p)})
             for q in range(3) for p in range(4)]
    sf = ScoreFile.load(_write(tmp_path / "s.jsonl", "\n".join(lines) + "\n\n"))
    got = sf.lookup([2, "0"], [[3, 0, 1], ["1", 2, 0]])
    assert got.shape == (2, 3)
    assert got.tolist() == [[23.0, 20.0, 21.0], [1.0, 2.0, 0.0]]
    assert sf.lookup([], []).shape == (0, 0)
    with pytest.raises(ValueError):
        sf.lookup([0, 1], [[0, 1], [0]])


def test_missing_pairs_message(tmp_path):
    long_passage = "x" * 200
    sf = ScoreFile.load(_write(tmp_path / "scores.jsonl", _jsonl(False)))
    with pytest.raises(UserError) as err:
        sf.lookup([QUERIES["7"], "unknown query"],
                  [[PASSAGES["10"], long_passage, PASSAGES["11"]], [PASSAGES["10"], "b", "c"]])
    msg = str(err.value)
    assert "scores.jsonl" in msg and "4 of 6" in msg
    assert long_passage not in msg and "xxx…" in msg  # truncated
    assert "'unknown query', 'A cat is" in msg and "'unknown query', 'b'" in msg
    assert "'unknown query', 'c'" not in msg and "…;" in msg  # only the first 3 are shown
    assert "score them" in msg and "query_id" in msg


def test_missing_pairs_by_id(tmp_path):
    sf = ScoreFile.load(_write(tmp_path / "ids.tsv", _tsv(True)))
    with pytest.raises(UserError, match=r"1 of 2 .*'7', '99'"):
        sf.lookup(["7"], [["10", "99"]])


def test_identical_duplicates_are_fine(tmp_path):
    text = _jsonl(True) + _jsonl(True)
    sf = ScoreFile.load(_write(tmp_path / "dup.jsonl", text))
    assert len(sf) == 3 and sf.lines == 6


@pytest.mark.parametrize("name,text,second,first", [
    ("dup.jsonl", '{"query": "q", "passage": "p", "score": 1}\n{"query": "q", "passage": "o", "score": 2}\n'
                  '{"query": "q", "passage": "p", "score": 1.5}\n', 3, 1),
    ("dup.tsv", "query_id\tpassage_id\tscore\n1\t2\t0.5\n\n1\t3\t1\n1\t2\t0.25\n", 5, 2),
    ("dup_triples.tsv.gz", "1\t0\t7\t10\t11\n1\t0\t7\t10\t12\n2\t0\t7\t10\t13\n", 3, 1),
])
def test_conflicting_duplicates_name_both_lines(tmp_path, name, text, second, first):
    with pytest.raises(UserError) as err:
        ScoreFile.load(_write(tmp_path / name, text))
    msg = str(err.value)
    assert name in msg and f"line {second}:" in msg and f"line {first}" in msg


ERRORS = [
    ("bad.jsonl", '{"query": "q", "passage": "p", "score": 1}\n{"query": "q", "passage": \n', 2, "JSON"),
    ("bad.jsonl", '{"query": "q", "passage": "p", "score": 1}\n{"query": "q", "score": 1}\n', 2, "passage"),
    ("bad.jsonl", '{"query": "q", "passage": "p"}\n', 1, "score"),
    ("bad.jsonl", '{"query": "q", "passage": "p", "score": "high"}\n', 1, "not a number"),
    ("bad.jsonl", '{"query": "q", "passage": "p", "score": true}\n', 1, "not a number"),
    ("bad.jsonl", '\n{"query": "q", "passage": "p", "score": NaN}\n', 2, "finite"),
    ("bad.jsonl", '{"query": "q", "passage": "p", "score": 1}\n{"query_id": 1, "passage_id": 2, "score": 1}\n',
     2, "mixed"),
    ("bad.jsonl", '{"query": "q", "passage_id": 2, "score": 1}\n', 1, "one kind"),
    ("bad.jsonl", '{"query_id": [1], "passage_id": 2, "score": 1}\n', 1, "id"),
    ("bad.jsonl", '[1, 2, 3]\n', 1, "JSON object"),
    ("bad.jsonl", "", 1, "empty"),
    ("bad.jsonl.gz", "\n\n", 1, "empty"),
    ("bad.tsv", "query_id\tpassage_id\tscore\n1\t2\tabc\n", 2, "not a number"),
    ("bad.tsv", "query_id\tpassage_id\tscore\n1\t2\tinf\n", 2, "finite"),
    ("bad.tsv", "query_id\tpassage_id\tscore\n1\t2\n", 2, "3 tab-separated fields"),
    ("bad.tsv", "query_id\tpassage_id\tscore\n", 2, "no scores"),
    ("bad.tsv", "qid\tpid\tscore\n1\t2\t3\n", 1, "header"),
    ("bad.tsv", "query\tpassage\tquery_id\tpassage_id\tscore\n", 1, "one kind"),
    ("bad.csv", "query,passage,score\nq,p,1\nq,o,\n", 3, "not a number"),
    ("bad.csv.gz", "query,passage,score\nq,p,1\n\n\"q\",\"o\",nan\n", 4, "finite"),
    ("bad_triples.tsv", "1.0\t2.0\t7\t10\t11\n1.0\t2.0\t7\t10\n", 2, "5 tab-separated fields"),
    ("bad_triples.tsv", "1.0\t2.0\t7\t10\t11\n1.0\tx\t7\t10\t12\n", 2, "score_neg"),
    ("bad_triples.tsv.gz", "1.0\t2.0\t7\t10\t11\n1.0\t2.0\t7\t\t12\n", 2, "pid_pos"),
]


@pytest.mark.parametrize("name,text,line,what", ERRORS, ids=[f"{e[0]}-{e[3]}" for e in ERRORS])
def test_errors_name_file_and_line(tmp_path, name, text, line, what):
    path = _write(tmp_path / name, text)
    with pytest.raises(UserError) as err:
        ScoreFile.load(path)
    msg = str(err.value)
    assert str(path) in msg and f"line {line}:" in msg
    assert what.lower() in msg.lower()


def test_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"query\tpassage\tscore\nq\tp\t1\nq\t\xff\xfe\t2\n")
    with pytest.raises(UserError, match=r"bad\.tsv: line 3: not UTF-8"):
        ScoreFile.load(path)


def test_truncated_gzip_and_missing_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress((_jsonl(True) * 50).encode())[:-20])
    with pytest.raises(UserError, match="cut.jsonl.gz: line .*gzip"):
        ScoreFile.load(path)
    with pytest.raises(UserError, match="nothing.tsv"):
        ScoreFile.load(tmp_path / "nothing.tsv")


def test_records_by_ids(tmp_path):
    sf = ScoreFile.load(_write(tmp_path / "t.tsv", _triples()))
    records = [{"query": "ignored", "positive": "ignored", "negatives": ["a", "b"],
                "query_id": 7, "positive_id": "10", "negative_ids": [11, "12"]},
               {"query_id": "7", "positive_id": 12, "negative_ids": ["11", "10"]}]
    got = sf.scores_for_records(records)
    assert got.tolist() == [[9.5, -1.25, 0.5], [0.5, -1.25, 9.5]]
    assert sf.scores_for_records(records, n_candidates=2).tolist() == [[9.5, -1.25], [0.5, -1.25]]
    assert sf.scores_for_records([{"query_id": 7, "positive_id": 10}]).shape == (1, 1)


def test_records_by_texts(tmp_path):
    sf = ScoreFile.load(_write(tmp_path / "t.csv", _csv(False)))
    rec = {"query": QUERIES["7"], "positive": PASSAGES["12"], "negatives": [PASSAGES["10"], PASSAGES["11"]],
           "query_id": "not used"}
    torch.testing.assert_close(sf.scores_for_records([rec, rec]), torch.tensor([[0.5, 9.5, -1.25]] * 2))


def test_record_errors(tmp_path):
    by_ids = ScoreFile.load(_write(tmp_path / "t.tsv", _triples()))
    ok = {"query_id": 7, "positive_id": 10, "negative_ids": [11]}
    with pytest.raises(UserError, match=r"record 2: no `positive_id`.*t\.tsv is keyed by ids"):
        by_ids.scores_for_records([ok, {"query_id": 7, "query": "q", "positive": "p"}])
    with pytest.raises(UserError, match="record 1: no `negative_ids`"):
        by_ids.scores_for_records([{"query_id": 7, "positive_id": 10, "negatives": ["x"]}])
    with pytest.raises(UserError, match="record 1: `negative_ids` has 1 ids but `negatives` has 2"):
        by_ids.scores_for_records([{**ok, "negatives": ["x", "y"]}])
    with pytest.raises(UserError, match="record 2: 2 `negative_ids`, but record 1 has 1"):
        by_ids.scores_for_records([ok, {**ok, "negative_ids": [11, 12]}])
    with pytest.raises(UserError, match="record 1: 1 `negative_ids`, but 2 are needed"):
        by_ids.scores_for_records([ok], n_candidates=3)
    with pytest.raises(UserError, match="1 of 2"):
        by_ids.scores_for_records([{**ok, "negative_ids": [99]}])
    by_text = ScoreFile.load(_write(tmp_path / "t.jsonl", _jsonl(False)))
    with pytest.raises(UserError, match="record 1: no `query`.*keyed by texts"):
        by_text.scores_for_records([{"query_id": 7, "positive_id": 10}])
