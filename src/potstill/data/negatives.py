"""Ranking data: (query, positive, negatives) records, the passage collection, relevance, and hard negatives.

Records hold `query`, `positive` (a relevant passage) and optionally `negatives` (a list of passages, the same
number for every record, or none for every record). The collection is every distinct positive of the data plus
the passages of an extra collection file. Relevance (`Relevance`): a record's own positive (level "record"),
or every positive given for the same query text (level "query"), so several records per query act as qrels.

Hard-negative mining (`mine_negatives`): each record without negatives gets the top-ranked passages of the
collection under a bi-encoder, searched with an exact FAISS inner-product index (unit vectors for cosine) in
blocks of queries, so a large collection never needs a (Q, P) score matrix. A passage relevant to the query is
never mined; when relevant passages crowd the top ranks, the next passages in collection order fill up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from potstill.errors import UserError

SEARCH_BLOCK = 4096  # queries per FAISS search call
SEARCH_SLACK = 8  # extra ranks searched, so that skipped relevant passages rarely leave a record short


def ranking_records(records: list[dict], field: str, negatives: int) -> list[dict]:
    """Copies of `records` after checking their `negatives`: a non-empty list of passages for every record
    (the same length) or for none (then `negatives` are mined per query); errors name `field`."""
    counts = {len(rec["negatives"]) for rec in records if rec.get("negatives") is not None}
    given = sum(rec.get("negatives") is not None for rec in records)
    if given and given != len(records):
        raise UserError(f"{field}: {given} of {len(records)} records have `negatives`; give them for every "
                        f"record, or for none (then {negatives} are mined per query)")
    for i, rec in enumerate(records):
        passages = rec.get("negatives")
        if passages is not None and (not isinstance(passages, list) or not passages
                                     or not all(isinstance(x, str) for x in passages)):
            raise UserError(f"{field}: record {i + 1}: `negatives` must be a non-empty list of passages")
    if len(counts) > 1:
        raise UserError(f"{field}: every record needs the same number of negatives; found {sorted(counts)}")
    return [dict(rec) for rec in records]


def collection_passages(rows: list[dict]) -> list[str]:
    """The passages of a collection file's rows: each row's `passage` string (or `text`, when the first row
    has no `passage`)."""
    key = "passage" if rows and "passage" in rows[0] else "text"
    for i, row in enumerate(rows):
        if not isinstance(row.get(key), str):
            raise UserError(f"data.collection: record {i + 1}: expected a `passage` (or `text`) string")
    return [row[key] for row in rows]


def build_collection(records: list[dict], extra: list[str]) -> list[str]:
    """Every distinct positive of `records` and every passage of `extra`, sorted."""
    return sorted({rec["positive"] for rec in records} | set(extra))


class Relevance:
    """Which passages are relevant to a record's query: its own positive (`level` "record"), or every positive
    of `records` given for the same query text (`level` "query")."""

    def __init__(self, records: list[dict], level: str) -> None:
        self.level = level
        self.by_query: dict[str, set[str]] = {}
        for rec in records:
            self.by_query.setdefault(rec["query"], set()).add(rec["positive"])

    def __call__(self, rec: dict) -> set[str]:
        if self.level == "query":
            return self.by_query[rec["query"]]
        return {rec["positive"]}


def top_k_passages(queries: torch.Tensor, passages: torch.Tensor, k: int, *, similarity: str) -> list[list[int]]:
    """Each query's top-k passage indices by `similarity` ("dot" or "cosine"): an exact FAISS inner-product
    index (unit vectors for cosine), searched in blocks of `SEARCH_BLOCK` queries."""
    import faiss

    if similarity == "cosine":
        queries, passages = nn.functional.normalize(queries, dim=-1), nn.functional.normalize(passages, dim=-1)
    index = faiss.IndexFlatIP(passages.shape[1])
    index.add(passages.float().contiguous().numpy())
    ranked: list[list[int]] = []
    for start in range(0, len(queries), SEARCH_BLOCK):
        _, ids = index.search(queries[start:start + SEARCH_BLOCK].float().contiguous().numpy(), k)
        ranked += ids.tolist()
    return ranked


def mine_negatives(records: list[dict], collection: list[str], relevant_to: Callable[[dict], set[str]], *,
                   negatives: int, encode: Callable[[list[str], str], torch.Tensor], similarity: str) -> None:
    """Give each record without `negatives` the `negatives` top-ranked collection passages not relevant to it
    (in place). `encode(texts, side)` gives a bi-encoder's vectors, side "query" or "passage"."""
    todo = [rec for rec in records if rec.get("negatives") is None]
    if not todo:
        return
    n = negatives
    if len(collection) <= n:
        raise UserError(f"ranking.negatives is {n}, but the collection has only {len(collection)} distinct "
                        f"passages; lower ranking.negatives or give `negatives` in the data")
    passages = encode(collection, "passage")
    queries = encode([rec["query"] for rec in todo], "query")
    ranked = top_k_passages(queries, passages, min(len(collection), n + SEARCH_SLACK), similarity=similarity)
    for rec, row in zip(todo, ranked, strict=True):
        relevant = relevant_to(rec)
        picks = [collection[j] for j in row if collection[j] not in relevant][:n]
        if len(picks) < n:  # positives among the top: take the next passages in collection order
            picks += [p for p in collection if p not in relevant and p not in picks][:n - len(picks)]
        rec["negatives"] = picks
