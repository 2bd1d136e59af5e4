"""A teacher that is a file of precomputed relevance scores for (query, passage) pairs.

Ranking distillation often starts from scores, not a model: Hofstätter et al. (Margin-MSE, "Improving
Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation"; TAS-B) released the scores
of their MS MARCO cross-encoder ensemble as a headerless TSV with one training triple per line. `ScoreFile`
reads such files, and simpler ones, into a dict `(query key, passage key) -> score` and looks up the
(B, 1 + N) teacher matrix of a batch of ranking records.

Formats (each may also be gzip-compressed; detected by its magic bytes, so `.gz` names are optional):

- JSON lines (`.jsonl`, `.json`, `.ndjson`, or any file whose first line starts with `{`): one object per
  line, either `{"query": str, "passage": str, "score": float}` (keyed by texts) or
  `{"query_id": ..., "passage_id": ..., "score": float}` (keyed by ids; an id is an int or a string and is
  compared as a string). One file uses one kind of key.
- CSV / TSV with a header line naming the same columns, `query,passage,score` or
  `query_id,passage_id,score` (other columns are ignored). `.csv` files are comma-separated with the usual
  CSV quoting; `.tsv` files are split on tabs, without quoting; other names are tab-separated when the
  header has a tab. Tab-separated fields may hold quotes and commas but not tabs or newlines.
- The headerless 5-column triples TSV, `score_pos<TAB>score_neg<TAB>qid<TAB>pid_pos<TAB>pid_neg` (the
  released teacher scores; recognised by a first line of 5 tab-separated fields whose first two are
  numbers). Each line gives two id pairs, (qid, pid_pos) and (qid, pid_neg).

Blank lines are skipped. A pair given twice with the same score is fine (the triples file repeats each
positive); with different scores it is an error naming both lines. Every mistake is a `UserError` naming
the file, the 1-based line and what was expected.

How the ranking task uses it: when a score file is given, the teacher scores of the training candidates
come from the file (`ScoreFile.scores_for_records`), by the records' texts or by their `query_id`,
`positive_id`, `negative_ids` when the file is keyed by ids; the teacher model is then needed only for
anything else (mining negatives, teacher metrics on held-out records, layer-initialised students).
`ScoreFile.sha256` identifies the file in the teacher-cache manifest (`potstill.teachers.score_cache`, which
also combines several files into an ensemble).

Memory: one dict entry per distinct pair, keys interned (a query repeated on many lines is stored once),
values Python floats; for id keys that is a few hundred bytes per distinct pair, fine up to tens of
millions of lines. Conflicting duplicates are located by reading the file a second time, so no per-pair
line numbers are kept.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from potstill.errors import UserError
from potstill.io import sha256_file

_TEXT_KEYS = ("query", "passage")
_ID_KEYS = ("query_id", "passage_id")
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_TSV_SUFFIXES = {".tsv", ".tab"}
_CSV_SUFFIXES = {".csv"}
_FORMATS_HINT = ("JSON lines with query/passage/score or query_id/passage_id/score, a CSV/TSV with a header "
                 "naming those columns, or the headerless 5-column TSV score_pos, score_neg, qid, pid_pos, "
                 "pid_neg")

Row = tuple[int, str, str, float]  # (1-based line, query key, passage key, score)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return repr(text)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _Reader:
    """Detects a score file's format and yields its rows; `rows()` can be run more than once."""

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        try:
            self.gzip = _is_gzip(path)
        except OSError as exc:
            raise UserError(f"{self.name}: cannot read the score file: {exc.strerror or exc}") from None
        inner = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
        self.suffix = Path(inner).suffix.lower()
        self.by_ids: bool | None = None  # set by the header, or by the first JSON row
        self.format, self.delimiter = self._detect()

    def error(self, line: int, what: str) -> UserError:
        return UserError(f"{self.name}: line {line}: {what}")

    # ---- opening and decoding
    def _lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text without its line ending); lines are split on "\\n" and decoded one by one, so a
        decoding error names its own line."""
        number = 0
        try:
            with open(self.path, "rb") as raw:
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzip else raw
                for number, data in enumerate(stream, 1):
                    try:
                        line = data.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise self.error(number, f"not UTF-8 text (byte {exc.start + 1} of the line); expected a "
                                                 f"UTF-8 score file, optionally gzip-compressed") from None
                    if number == 1 and line.startswith("\ufeff"):
                        line = line[1:]
                    yield number, line.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise self.error(number + 1, f"corrupt or truncated gzip data ({exc})") from None
        except OSError as exc:
            raise UserError(f"{self.name}: cannot read the score file: {exc.strerror or exc}") from None

    def _first_line(self) -> tuple[int, str] | None:
        lines = self._lines()
        try:
            for number, line in lines:
                if line.strip():
                    return number, line
            return None
        finally:
            lines.close()

    def _detect(self) -> tuple[str, str]:
        first = self._first_line()
        if first is None:
            raise self.error(1, f"the score file is empty; expected {_FORMATS_HINT}")
        number, line = first
        if self.suffix in _JSON_SUFFIXES or (self.suffix not in _TSV_SUFFIXES | _CSV_SUFFIXES
                                             and line.lstrip().startswith(("{", "["))):
            return "jsonl", ""
        delimiter = "," if self.suffix in _CSV_SUFFIXES else "\t"
        if self.suffix not in _TSV_SUFFIXES | _CSV_SUFFIXES and "\t" not in line:
            delimiter = ","
        if delimiter == "\t":
            fields = line.split("\t")
            if len(fields) == 5 and _is_number(fields[0]) and _is_number(fields[1]):
                self.by_ids = True
                return "triples", "\t"
        header = next(csv.reader([line], delimiter=delimiter)) if delimiter == "," else line.split("\t")
        self.header_line = number
        self.columns = self._columns(number, header)
        return ("csv" if delimiter == "," else "tsv"), delimiter

    def _columns(self, number: int, header: list[str]) -> tuple[int, int, int, int]:
        names = [h.strip().lower() for h in header]
        has_text = all(k in names for k in _TEXT_KEYS)
        has_ids = all(k in names for k in _ID_KEYS)
        if "score" not in names or not (has_text or has_ids):
            raise self.error(number, f"expected a header naming the columns query,passage,score or "
                                     f"query_id,passage_id,score, or the headerless 5-column triples "
                                     f"score_pos, score_neg, qid, pid_pos, pid_neg (tab-separated); found "
                                     f"{_short(','.join(header), 120)}")
        if has_text and has_ids:
            raise self.error(number, "the header names both query/passage and query_id/passage_id; a score file "
                                     "uses one kind of key, keep only one pair of columns")
        self.by_ids = has_ids
        keys = _ID_KEYS if has_ids else _TEXT_KEYS
        for column in (*keys, "score"):
            if names.count(column) > 1:
                raise self.error(number, f"the header names the column {column!r} twice")
        return names.index(keys[0]), names.index(keys[1]), names.index("score"), len(names)

    # ---- rows
    def rows(self) -> Iterator[Row]:
        return {"jsonl": self._json_rows, "triples": self._triple_rows,
                "tsv": self._tsv_rows, "csv": self._csv_rows}[self.format]()

    def _score(self, number: int, value: str, what: str = "score") -> float:
        try:
            score = float(value)
        except ValueError:
            raise self.error(number, f"{what} {_short(value)} is not a number") from None
        if not math.isfinite(score):
            raise self.error(number, f"{what} is {value.strip()}; expected a finite number")
        return score

    def _id(self, number: int, value: str, what: str) -> str:
        value = value.strip()
        if not value:
            raise self.error(number, f"{what} is empty; expected an id")
        return sys.intern(value)

    def _json_rows(self) -> Iterator[Row]:
        first_kind_line = 0
        for number, line in self._lines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise self.error(number, f"unreadable JSON ({exc.msg} at column {exc.colno}); expected one "
                                         f"JSON object per line") from None
            if not isinstance(row, dict):
                raise self.error(number, f"expected a JSON object with query/passage/score or "
                                         f"query_id/passage_id/score, found a {type(row).__name__}")
            has_ids = any(k in row for k in _ID_KEYS)
            has_text = any(k in row for k in _TEXT_KEYS)
            if has_ids and has_text:
                raise self.error(number, "the row has both text keys (query/passage) and id keys "
                                         "(query_id/passage_id); a score file uses one kind of key")
            if not has_ids and not has_text:
                raise self.error(number, f"missing keys: expected query, passage, score (or query_id, "
                                         f"passage_id, score); found {sorted(row)}")
            if self.by_ids is None:
                self.by_ids, first_kind_line = has_ids, number
            elif has_ids != self.by_ids:
                first = "query_id/passage_id" if self.by_ids else "query/passage"
                this = "query_id/passage_id" if has_ids else "query/passage"
                raise self.error(number, f"mixed key kinds: this row uses {this}, but line {first_kind_line} "
                                         f"uses {first}; a score file uses one kind of key")
            keys = _ID_KEYS if has_ids else _TEXT_KEYS
            for key in (*keys, "score"):
                if key not in row:
                    raise self.error(number, f"missing key {key!r}; expected {', '.join((*keys, 'score'))}")
            score = row["score"]
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise self.error(number, f"score {_short(json.dumps(score))} is not a number")
            score = float(score)
            if not math.isfinite(score):
                raise self.error(number, f"score is {score}; expected a finite number")
            if has_ids:
                q, p = (self._json_id(number, row[k], k) for k in keys)
            else:
                q, p = (self._json_text(number, row[k], k) for k in keys)
            yield number, q, p, score

    def _json_id(self, number: int, value: Any, key: str) -> str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(number, f"{key} must be an int or a string id, found {_short(json.dumps(value))}")
        return self._id(number, str(value), key)

    def _json_text(self, number: int, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(number, f"{key} must be a string, found {_short(json.dumps(value))}")
        return sys.intern(value)

    def _triple_rows(self) -> Iterator[Row]:
        for number, line in self._lines():
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 5:
                raise self.error(number, f"expected 5 tab-separated fields (score_pos, score_neg, qid, pid_pos, "
                                         f"pid_neg), found {len(fields)}")
            pos = self._score(number, fields[0], "score_pos")
            neg = self._score(number, fields[1], "score_neg")
            qid = self._id(number, fields[2], "qid")
            yield number, qid, self._id(number, fields[3], "pid_pos"), pos
            yield number, qid, self._id(number, fields[4], "pid_neg"), neg

    def _table_row(self, number: int, fields: list[str]) -> Row:
        qi, pi, si, width = self.columns
        if len(fields) != width:
            sep = "tab" if self.delimiter == "\t" else "comma"
            raise self.error(number, f"expected {width} {sep}-separated fields like the header, found "
                                     f"{len(fields)}")
        score = self._score(number, fields[si])
        if self.by_ids:
            return number, self._id(number, fields[qi], _ID_KEYS[0]), self._id(number, fields[pi], _ID_KEYS[1]), score
        return number, sys.intern(fields[qi]), sys.intern(fields[pi]), score

    def _tsv_rows(self) -> Iterator[Row]:
        header_seen = False
        for number, line in self._lines():
            if not line.strip():
                continue
            if not header_seen:
                header_seen = True
                continue
            yield self._table_row(number, line.split("\t"))

    def _csv_rows(self) -> Iterator[Row]:
        lines = self._lines()
        # csv joins a quoted field across lines itself; `_lines` strips the endings, so give them back
        reader = csv.reader((line + "\n" for _, line in lines))
        header_seen = False
        try:
            for fields in reader:
                if not fields or not any(f.strip() for f in fields):
                    continue
                if not header_seen:
                    header_seen = True
                    continue
                yield self._table_row(reader.line_num, fields)
        except csv.Error as exc:
            raise self.error(reader.line_num, f"unreadable CSV ({exc})") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ScoreFile:
    """Precomputed teacher scores of (query, passage) pairs, keyed by texts or by ids (see the module doc)."""

    def __init__(self, path: Path, scores: dict[tuple[str, str], float], *, by_ids: bool, sha256: str,
                 lines: int):
        self.path = path
        self._scores = scores
        self._by_ids = by_ids
        self._sha256 = sha256
        self.lines = lines  # data lines read (a triples line gives two pairs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreFile:
        """Read a score file in any of the accepted formats; mistakes raise `UserError`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such score file" + (" (it is a folder)" if path.is_dir() else ""))
        reader = _Reader(path)
        scores: dict[tuple[str, str], float] = {}
        setdefault = scores.setdefault
        last_line, lines = 0, 0  # a triples line yields two rows
        for number, q, p, score in reader.rows():
            if number != last_line:
                last_line, lines = number, lines + 1
            old = setdefault((q, p), score)
            if old != score:
                raise cls._conflict(reader, number, q, p, old, score)
        if not scores:
            raise reader.error(reader.header_line + 1, "no scores: expected at least one row after the header")
        assert reader.by_ids is not None
        return cls(path, scores, by_ids=reader.by_ids, sha256=sha256_file(path), lines=lines)

    @staticmethod
    def _conflict(reader: _Reader, number: int, q: str, p: str, old: float, new: float) -> UserError:
        first = next(n for n, q2, p2, _ in reader.rows() if q2 == q and p2 == p)
        kind = "(query_id, passage_id)" if reader.by_ids else "(query, passage)"
        return reader.error(number, f"the pair {kind} ({_short(q)}, {_short(p)}) has score {new!r} here but "
                                    f"{old!r} on line {first}; give each pair one score (identical duplicates "
                                    f"are fine)")

    # ---- properties
    @property
    def by_ids(self) -> bool:
        """True when the file is keyed by (query_id, passage_id), False for (query, passage) texts."""
        return self._by_ids

    @property
    def sha256(self) -> str:
        """Hex sha256 of the file's bytes when it was loaded (for cache manifests)."""
        return self._sha256

    def __len__(self) -> int:
        return len(self._scores)

    def __repr__(self) -> str:
        kind = "ids" if self._by_ids else "texts"
        return f"ScoreFile({str(self.path)!r}, {len(self)} pairs keyed by {kind})"

    # ---- lookups
    def _key(self, value: Any) -> Any:
        return str(value).strip() if self._by_ids else value

    def has_pair(self, query: Any, passage: Any) -> bool:
        """Whether the file scores (query, passage): texts, or ids when `by_ids`."""
        return (self._key(query), self._key(passage)) in self._scores

    def lookup(self, queries: Sequence[Any], candidates: Sequence[Sequence[Any]]) -> torch.Tensor:
        """(B, C) float32 scores of each query's candidates, in the given order; every pair must be in the file."""
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        width = len(candidates[0]) if len(candidates) else 0
        for i, cands in enumerate(candidates):
            if len(cands) != width:
                raise ValueError(f"every query needs the same number of candidates: query {i} has {len(cands)}, "
                                 f"query 0 has {width}")
        get, key = self._scores.get, self._key
        values: list[float] = []
        n_missing, shown = 0, []
        for q, cands in zip(queries, candidates, strict=True):
            qk = key(q)
            for p in cands:
                score = get((qk, key(p)))
                if score is None:
                    n_missing += 1
                    if len(shown) < 3:
                        shown.append((q, p))
                    score = math.nan
                values.append(score)
        if n_missing:
            raise self._missing_error(n_missing, len(values), shown)
        return torch.tensor(values, dtype=torch.float32).reshape(len(queries), width)

    def _missing_error(self, n_missing: int, total: int, shown: list[tuple[Any, Any]]) -> UserError:
        kind = "(query_id, passage_id)" if self._by_ids else "(query, passage)"
        examples = ", ".join(f"({_short(q)}, {_short(p)})" for q, p in shown)
        more = ", …" if n_missing > len(shown) else ""
        if self._by_ids:
            fix = ("add their scores to the file (score them with the teacher), or check that the records' "
                   "`query_id`, `positive_id` and `negative_ids` are the ids the file uses")
        else:
            fix = ("add their scores to the file (score them with the teacher, with exactly these texts), or use "
                   "a score file keyed by ids and give the records `query_id`, `positive_id` and `negative_ids`")
        return UserError(f"{self.path}: {n_missing} of {total} {kind} pairs have no score in the file, e.g. "
                         f"{examples}{more}; {fix}")

    def scores_for_records(self, records: Sequence[dict], *, n_candidates: int | None = None) -> torch.Tensor:
        """(B, 1 + N) teacher scores of ranking records, the positive first.

        Keys are the records' `query`/`positive`/`negatives` texts, or `query_id`/`positive_id`/`negative_ids`
        when the file is keyed by ids. Without `n_candidates` every record must have the same number of
        negatives; with it, each record's first `n_candidates - 1` negatives are used (fewer is an error).
        """
        if n_candidates is not None and n_candidates < 1:
            raise ValueError(f"n_candidates must be ≥ 1, got {n_candidates}")
        fields = ("query_id", "positive_id", "negative_ids") if self._by_ids else ("query", "positive", "negatives")
        queries: list[Any] = []
        candidates: list[list[Any]] = []
        for i, rec in enumerate(records, 1):
            q, pos, negs = (rec.get(f) for f in fields)
            for field, value in zip(fields[:2], (q, pos), strict=True):
                if value is None:
                    raise self._record_error(i, field)
            if negs is None and rec.get("negatives") and self._by_ids:
                raise self._record_error(i, "negative_ids")
            negs = [] if negs is None else negs
            if not isinstance(negs, list | tuple):
                raise UserError(f"record {i}: `{fields[2]}` must be a list, found {type(negs).__name__}")
            if self._by_ids and rec.get("negatives") is not None and len(rec["negatives"]) != len(negs):
                raise UserError(f"record {i}: `negative_ids` has {len(negs)} ids but `negatives` has "
                                f"{len(rec['negatives'])} passages; give one id per negative, in the same order")
            if n_candidates is not None:
                if len(negs) < n_candidates - 1:
                    raise UserError(f"record {i}: {len(negs)} `{fields[2]}`, but {n_candidates - 1} are needed for "
                                    f"{n_candidates} candidates per query")
                negs = negs[:n_candidates - 1]
            elif candidates and len(negs) != len(candidates[0]) - 1:
                raise UserError(f"record {i}: {len(negs)} `{fields[2]}`, but record 1 has {len(candidates[0]) - 1}; "
                                f"every record needs the same number")
            queries.append(q)
            candidates.append([pos, *negs])
        return self.lookup(queries, candidates)

    def _record_error(self, number: int, field: str) -> UserError:
        if self._by_ids:
            why = (f"the score file {self.path} is keyed by ids, so every record needs `query_id` and "
                   f"`positive_id` (and `negative_ids` when it has negatives)")
        else:
            why = f"the score file {self.path} is keyed by texts, so every record needs `query` and `positive`"
        return UserError(f"record {number}: no `{field}`; {why}")
