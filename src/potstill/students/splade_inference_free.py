"""The inference-free query side of a sparse retriever, Geng et al. 2024 ("Towards Competitive Search Relevance
For Inference-Free Learned Sparse Retrievers", arXiv 2411.04403): queries are not encoded by a model but
looked up, q_t = ReLU(idf_t) when token t occurs in the query (once, however often), 0 otherwise and for
special tokens; the score against a SPLADE document vector w_d (`potstill.students.splade`) is the dot product
s(q, d) = Σ_t q_t·w_d,t = Σ_{t∈q} ReLU(idf_t)·w_d,t, the IDF computed once over the passage collection.

Conventions confirmed against the official code, zhichao-aws/opensearch-sparse-model-tuning-sample
(the first author's copy of opensearch-project/opensearch-sparse-model-tuning-sample):

* scripts/model/sparse_encoders.py, `SparseModel._encode_inf_free`: a `[B, V]` zero matrix gets 1 at every input
  id (assignment, so a repeated token counts once), the tokenizer's special tokens are reset to 0, and the result
  is multiplied by ReLU(idf). Tokens missing from the IDF file keep the default weight 1.0 there
  (`idf_vector = [1.0] * V`). Padding is dropped only because [PAD] is a special token; here the attention mask
  is applied as well.
* get_idf.py: passages tokenised without special tokens and without truncation; df_t = number of passages
  that contain t (distinct non-special ids per passage); N = number of passages with at least one non-special
  token; idf_t = log(1 + (N − df_t + 0.5)/(df_t + 0.5)) (the BM25/Lucene IDF, always > 0 for seen tokens);
  only tokens seen are written to idf.json.

Sentence-transformers 6.2: `SparseStaticEmbedding` tokenises without special tokens and returns presence(t) ·
weight_t with presence set by a scatter of the attention mask (counted once); `SparseStaticEmbedding.from_json`
fills tokens absent from idf.json with 0 (the official training code above uses 1.0). `query_weights_for_saving`
gives the weights that make it reproduce `inference_free_query`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from potstill.errors import UserError

UNSEEN_CHOICES = ("max", "zero")


def _check_ids(input_ids: Tensor, attention_mask: Tensor) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")


@torch.no_grad()
def inference_free_query(input_ids: Tensor, attention_mask: Tensor, idf: Tensor, *,
                         special_ids: Iterable[int] = ()) -> Tensor:
    """`[B, V]` float32 query vectors of the inference-free retriever: q_b,t = ReLU(idf_t) if token t occurs at
    a real (attention-mask) position of query b, else 0; `special_ids` (pass `tokenizer.all_special_ids`:
    CLS / SEP / PAD / UNK / MASK, as the official `_encode_inf_free` does with the special-tokens map) are 0.

    A token repeated in the query counts once (presence, not count: the official code assigns 1, and
    sentence-transformers' `SparseStaticEmbedding` scatters the mask). No parameters and no gradient (`idf`
    is a constant; learning it, an option of the official code, is not supported here). V = len(idf); the
    result is on `input_ids`' device. Defaults: special_ids = () (none).
    """
    _check_ids(input_ids, attention_mask)
    if idf.dim() != 1:
        raise UserError(f"inference_free_query expected idf of shape (V,), one weight per vocabulary id, got "
                        f"shape {tuple(idf.shape)}")
    vocab = idf.shape[0]
    real = attention_mask.bool()
    if real.any() and int(input_ids[real].max()) >= vocab:
        raise UserError(f"inference_free_query: token id {int(input_ids[real].max())} is outside the IDF vector "
                        f"({vocab} entries); expected an IDF computed with the same tokenizer")
    ids = torch.where(real, input_ids, 0).long()
    presence = torch.zeros(input_ids.shape[0], vocab, device=input_ids.device)
    presence.scatter_reduce_(1, ids, real.to(presence.dtype), reduce="amax")
    special = sorted({int(t) for t in special_ids if 0 <= int(t) < vocab})
    if special:
        presence[:, special] = 0.0
    return presence * torch.relu(idf.detach().to(device=input_ids.device, dtype=torch.float32))


class InferenceFreeQuery(nn.Module):
    """The query "tower" of an inference-free sparse retriever: `inference_free_query` with a stored IDF.

    `idf` is a `(V,)` buffer (checkpointed with the student, zeros until set, e.g. from
    `idf_from_collection`); `special_ids` get weight 0. No parameters: queries cost a tokenisation and a
    lookup."""

    def __init__(self, vocab_size: int, special_ids: Iterable[int] = ()) -> None:
        super().__init__()
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.special_ids = sorted({int(t) for t in special_ids})

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return inference_free_query(input_ids, attention_mask, self.idf, special_ids=self.special_ids)


def idf_from_collection(tokenizer: Any, passages: Iterable[str], *, max_length: int | None = None,
                        unseen: Literal["max", "zero"] = "max", vocab_size: int | None = None,
                        batch_size: int = 1024) -> Tensor:
    """`(V,)` float32 IDF of the token ids over a passage collection, as the official get_idf.py:

        idf_t = log(1 + (N − df_t + 0.5) / (df_t + 0.5)),

    df_t = number of passages containing token t (each passage's distinct ids; tokenised without special tokens,
    truncated to `max_length` tokens when given, else not at all), N = number of passages with at least one
    non-special token. Special tokens (`tokenizer.all_special_ids`) get 0.

    Tokens never seen (df_t = 0), `unseen`:

    * "max" (default): the formula at df = 0, log(2N + 2), its largest value: an unseen token is at least as
      rare as the rarest seen one. This keeps query words that the training passages lack (typos, rare names,
      words of another collection once deployed) as strong evidence, as lexical IDF would, instead of silently
      dropping them from every query; a document can still reach them by expansion.
    * "zero": 0, as sentence-transformers' `SparseStaticEmbedding.from_json` fills tokens absent from idf.json
      (such a query token never contributes to a score).

    (The sources disagree: the official `SparseModel` gives such tokens 1.0.) V = `vocab_size` or, by default,
    `len(tokenizer)`; pass `encoder.config.vocab_size` when the model's vocabulary is padded beyond the
    tokenizer. Defaults: max_length None, unseen "max", vocab_size None, batch_size 1024.
    """
    if unseen not in UNSEEN_CHOICES:
        raise UserError(f"idf_from_collection: unseen must be one of {', '.join(UNSEEN_CHOICES)}, got {unseen!r}")
    if isinstance(passages, (str, bytes)):
        raise UserError("idf_from_collection expected a list (iterable) of passage strings, got a single string")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise UserError(f"idf_from_collection: max_length must be a positive int or None, got {max_length!r}")
    vocab = len(tokenizer) if vocab_size is None else int(vocab_size)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    df = torch.zeros(vocab, dtype=torch.float64)
    n_docs = 0

    def count(batch: list[str]) -> int:
        encoded = tokenizer(batch, add_special_tokens=False, truncation=max_length is not None,
                            max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
        lists = encoded["input_ids"]
        ids = torch.tensor([t for seq in lists for t in seq], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(seq) for seq in lists]))
        keep = ~torch.isin(ids, special)
        ids, rows = ids[keep], rows[keep]
        if ids.numel() == 0:
            return 0
        if int(ids.max()) >= vocab:
            raise UserError(f"idf_from_collection: token id {int(ids.max())} does not fit in vocab_size {vocab}; "
                            f"expected vocab_size ≥ len(tokenizer) = {len(tokenizer)}")
        pairs = torch.unique(rows * vocab + ids)  # each (passage, token) once
        df.add_(torch.bincount(pairs % vocab, minlength=vocab).to(df.dtype))
        return int(torch.unique(pairs // vocab).numel())

    batch: list[str] = []
    for i, text in enumerate(passages):
        if not isinstance(text, str):
            raise UserError(f"idf_from_collection: passage {i} is a {type(text).__name__}; expected a string")
        batch.append(text)
        if len(batch) >= batch_size:
            n_docs += count(batch)
            batch = []
    if batch:
        n_docs += count(batch)
    if n_docs == 0:
        raise UserError("idf_from_collection needs at least one passage with a non-special token; got none")
    idf = torch.log1p((n_docs - df + 0.5) / (df + 0.5))
    if unseen == "zero":
        idf = torch.where(df > 0, idf, 0.0)
    idf[special[special < vocab]] = 0.0
    return idf.float()


def query_weights_for_saving(query_idf: Tensor, special_ids: Sequence[int]) -> Tensor:
    """The `SparseStaticEmbedding` weights that reproduce `inference_free_query`: ReLU(idf), special ids 0
    (sentence-transformers multiplies presence by the weight and does not drop special tokens itself)."""
    weights = torch.relu(query_idf.detach().float().cpu()).clone()
    special = [int(t) for t in special_ids if 0 <= int(t) < weights.shape[0]]
    if special:
        weights[special] = 0.0
    return weights
