"""SPLADE-style sparse students: vocabulary-sized term weights from a masked-LM head (SPLADE-max, Formal et al.
2021), MLM heads for plain encoders, and saving as a sentence-transformers `SparseEncoder`.

Document side: w_d,t = max over the real tokens i of log(1 + ReLU(l_i,t)), l the MLM logits `[B, L, V]`, so w_d
is a `(V,)` vector of weights ≥ 0, mostly zero after FLOPS regularisation. The inference-free query side of Geng
et al. 2024 (queries looked up as ReLU(idf), no model) is `potstill.students.splade_inference_free`; a saved
inference-free model routes queries to those static weights.

Conventions confirmed against the official code, zhichao-aws/opensearch-sparse-model-tuning-sample
(the first author's copy of opensearch-project/opensearch-sparse-model-tuning-sample):

* scripts/model/sparse_encoders.py, `SparseModel._encode`: logits at padded positions are set to -inf, the
  max is taken over the sequence, then log(1 + ELU_α(x) + α) with α = 0, which is log(1 + ReLU(x)). Max and
  log1p∘ReLU commute (the activation is monotone), so this equals the max of the activated logits.

Sentence-transformers 6.2 (read in the installed package and the sbert.net sparse-encoder module reference):

* `SpladePooling(pooling_strategy="max", activation_function="relu")` computes max-pool log(1 + ReLU(x)) over
  the attention mask; `activation_function="log1p_relu"` is a *second* log1p, log(1 + log(1 + ReLU(x))), the
  OpenSearch v3 variant. The weights of `SpladeEncoder` are therefore saved with "relu".
* `MLMTransformer` is deprecated since 5.4 (kept to load old folders); a new folder uses
  `Transformer(path, transformer_task="fill-mask")`, which wraps `AutoModelForMaskedLM` the same way.
* `Router.for_query_document(query_modules, document_modules)` sends `encode_query` to the first list and
  `encode_document` (and plain `encode`, default route "document") to the second. All modules are imported from
  `sentence_transformers.sparse_encoder.modules`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from potstill.errors import UserError
from potstill.io import atomic_dir
from potstill.students.splade_inference_free import query_weights_for_saving


def _head_is_tied(mlm: nn.Module) -> bool:
    out, inp = mlm.get_output_embeddings(), mlm.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _tie_decoder(mlm: nn.Module) -> None:
    """Make the MLM decoder share the input word-embedding matrix (the BERT convention)."""
    mlm.config.tie_word_embeddings = True
    mlm.tie_weights()
    if not _head_is_tied(mlm):  # a model whose tie mapping ignores the config flag
        mlm.get_output_embeddings().weight = mlm.get_input_embeddings().weight


class _MaxPooledLogits(torch.autograd.Function):
    """max over the real tokens of (hidden · Wᵀ + b), `[B, V]`, without keeping `[B, L, V]` logits.

    Forward builds the logits `chunk` rows at a time and keeps only the max and its token index per
    (row, term). The gradient of a max reaches one token per (row, term), so backward is two sparse products
    with S = the `[B·L, V]` matrix holding g_b,t at (b·L + argmax_b,t, t): ∂hidden = S·W, ∂W = Sᵀ·hidden,
    ∂b = Σ_b g — O(nnz(g)·H) work instead of O(B·L·V·H), and no `[B, L, V]` tensor saved for backward.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, real: Tensor, chunk: int) -> Tensor:
        b, length, _ = hidden.shape
        values = torch.empty(b, weight.shape[0], device=hidden.device,
                             dtype=torch.promote_types(hidden.dtype, torch.float32))
        index = torch.empty(b, weight.shape[0], device=hidden.device, dtype=torch.long)
        for start in range(0, b, chunk):
            logits = hidden[start:start + chunk] @ weight.to(hidden.dtype).T
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            logits = logits.masked_fill(~real[start:start + chunk].unsqueeze(-1), float("-inf"))
            top = logits.max(dim=1)
            values[start:start + chunk], index[start:start + chunk] = top.values, top.indices
        ctx.save_for_backward(hidden, weight, index)
        ctx.has_bias, ctx.length = bias is not None, length
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, index = ctx.saved_tensors
        b, length, h = hidden.shape
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 math for half inputs
        grad = torch.nan_to_num(grad.to(dtype), nan=0.0)
        rows, terms = grad.nonzero(as_tuple=True)
        where = torch.stack([rows * length + index[rows, terms], terms])
        s = torch.sparse_coo_tensor(where, grad[rows, terms], (b * length, weight.shape[0]),
                                    check_invariants=False)
        flat = hidden.reshape(b * length, h).to(dtype)
        grad_hidden = torch.sparse.mm(s, weight.to(dtype)).reshape(b, length, h).to(hidden.dtype)
        grad_weight = torch.sparse.mm(s.t().coalesce(), flat).to(weight.dtype)
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


class _DecoderInput(Exception):
    """Raised by a pre-hook on the MLM decoder to stop the forward and hand over its input."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("decoder input captured")
        self.hidden = hidden


class SpladeEncoder(nn.Module):
    """SPLADE-max term weights of a masked-LM model: `forward` → `[B, V]` float32,
    w_b,t = max_{i : attention_mask_b,i = 1} log(1 + ReLU(logits_b,i,t)).

    `mlm` is a Hugging Face `*ForMaskedLM` (anything whose output has `.logits` of shape `[B, L, V]` and that has
    a `.config`). `.mlm` is that model and `.config` its config (`.config.vocab_size` = V). The max is taken on
    the logits before the activation (as the official `_encode`; equal, the activation being monotone). The
    activation runs in float32 with autocast disabled, so the output is float32 under autocast too; nothing is
    created on a fixed device. A row whose attention mask is all zero gives zeros.

    `fused` (default True, when the model's output embedding is an `nn.Linear`): the forward stops at the
    decoder's input and `_MaxPooledLogits` pools the logits `chunk_size` rows at a time with a sparse
    backward, so neither the `[B, L, V]` logits nor their gradient are ever kept; same values and gradients
    as the plain path (`fused=False`, the model's full `.logits`). Defaults: fused=True, chunk_size=8.
    """

    def __init__(self, mlm: nn.Module, *, fused: bool = True, chunk_size: int = 8) -> None:
        super().__init__()
        if not isinstance(mlm, nn.Module) or getattr(getattr(mlm, "config", None), "vocab_size", None) is None:
            raise UserError(f"SpladeEncoder expected a Hugging Face masked-LM model (e.g. BertForMaskedLM) with a "
                            f"config.vocab_size, got {type(mlm).__name__}; build one with splade_from_encoder")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise UserError(f"SpladeEncoder: chunk_size must be a positive int, got {chunk_size!r}")
        self.mlm, self.chunk_size = mlm, chunk_size
        self.fused = fused and isinstance(mlm.get_output_embeddings(), nn.Linear)

    @property
    def config(self) -> Any:
        """The inner model's config."""
        return self.mlm.config

    @property
    def vocab_size(self) -> int:
        return int(self.mlm.config.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """`[B, V]` float32 weights ≥ 0: the max over real tokens of log(1 + ReLU(MLM logits))."""
        pooled = self.max_logits(input_ids, attention_mask, token_type_ids)
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return torch.log1p(torch.relu(pooled.float()))

    def max_logits(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """`[B, V]` max over the real tokens of the MLM logits, before the activation (−inf for an empty row)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        real = attention_mask.bool()
        if self.fused:
            decoder = self.mlm.get_output_embeddings()

            def stop(module: nn.Module, args: tuple) -> None:
                raise _DecoderInput(args[0])

            handle = decoder.register_forward_pre_hook(stop)
            try:
                self.mlm(**inputs)
                raise RuntimeError(f"{type(self.mlm).__name__} never called its output embedding")
            except _DecoderInput as caught:
                hidden = caught.hidden
            finally:
                handle.remove()
            pooled = _MaxPooledLogits.apply(hidden, decoder.weight, decoder.bias, real, self.chunk_size)
        else:
            logits = self.mlm(**inputs).logits
            # max, not amax: at a tie (e.g. an all-zero embedding row, whose logit is its bias everywhere) the
            # gradient goes to one token, as in the official code and the fused path
            pooled = logits.masked_fill(~real.unsqueeze(-1), float("-inf")).max(dim=1).values
        return pooled


@torch.no_grad()
def calibrate_head_bias(encoder: SpladeEncoder, input_ids: Tensor, attention_mask: Tensor, *,
                        active_terms: int = 128, token_type_ids: Tensor | None = None) -> float:
    """Set a new head's decoder bias so that the median of these passages starts with `active_terms` active
    terms; returns the bias. The max-pooled logits without bias are computed, each row's `active_terms`-th
    largest value taken, and the bias set to minus their median (one scalar for every term). Guards against a head
    that starts with (almost) every term active, or none — a dead ReLU gives no gradient. Defaults:
    active_terms = 128 (SPLADE models keep ~100–200 terms per passage)."""
    decoder = encoder.mlm.get_output_embeddings()
    if not isinstance(decoder, nn.Linear) or decoder.bias is None:
        raise UserError(f"calibrate_head_bias needs an MLM decoder with a bias, got {type(decoder).__name__}")
    k = max(1, min(int(active_terms), encoder.vocab_size))
    saved = decoder.bias.detach().clone()
    decoder.bias.zero_()
    was_training = encoder.training
    encoder.eval()
    try:
        logits = encoder.max_logits(input_ids, attention_mask, token_type_ids).float()
    finally:
        encoder.train(was_training)
        decoder.bias.copy_(saved)
    kth = logits.topk(k, dim=1).values[:, -1]
    bias = -float(kth[torch.isfinite(kth)].median()) if torch.isfinite(kth).any() else 0.0
    decoder.bias.fill_(bias)
    return bias


def _is_masked_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return type(model).__name__ in names


HEAD_THRESHOLD = 6.0  # σ of an unrelated term's logit that a new head's decoder bias sits below


def _lexical_head_init(mlm: nn.Module, threshold: float = HEAD_THRESHOLD) -> None:
    """Start a NEW MLM head as a lexical matcher instead of a random map.

    Every square `nn.Linear` of the head outside the encoder (BERT's `transform.dense`, RoBERTa's
    `lm_head.dense`, DistilBERT's `vocab_transform`) becomes the identity with zero bias, so each token's state
    reaches the tied decoder as the encoder gives it, and the logit of term t is LayerNorm(act(h))·E_t: large for
    the token itself and its neighbours in embedding space. The decoder bias is −threshold × the mean row norm
    of E: for a state unrelated to t the logit has a standard deviation of about |E_t|, so such a term needs
    `threshold` σ to become active. Measured on all-MiniLM-L6-v2's layers 0 and 3 with threshold 6: a chatterbot
    answer starts with ~90 active terms and all of its own tokens, against ~30,000 of the 30,522 with the
    random head (whose top terms are noise), so training starts from a sparse bag of words + expansions.
    """
    decoder = mlm.get_output_embeddings()
    encoder_params = {id(p) for p in mlm.base_model.parameters()}
    with torch.no_grad():
        for module in mlm.modules():
            if (isinstance(module, nn.Linear) and module is not decoder and id(module.weight) not in encoder_params
                    and module.weight.shape[0] == module.weight.shape[1]):
                module.weight.copy_(torch.eye(module.weight.shape[0], dtype=module.weight.dtype))
                if module.bias is not None:
                    module.bias.zero_()
        if isinstance(decoder, nn.Linear) and decoder.bias is not None:
            decoder.bias.fill_(-threshold * float(decoder.weight.norm(dim=1).mean()))


def _masked_lm_from_base(encoder: nn.Module) -> nn.Module:
    """A new `*ForMaskedLM` for `encoder`'s config with the encoder's weights copied in, the decoder tied to the
    word embeddings and the new head started as a lexical matcher (`_lexical_head_init`); same dtype, device
    and train/eval mode."""
    from transformers import AutoModelForMaskedLM

    config = copy.deepcopy(encoder.config)
    config.tie_word_embeddings = True
    try:
        mlm = AutoModelForMaskedLM.from_config(config)
    except ValueError:
        raise UserError(
            f"splade_from_encoder: {type(encoder).__name__} (model_type {config.model_type!r}) has no masked-LM "
            f"class in transformers; expected an encoder such as BertModel, DistilBertModel or RobertaModel"
        ) from None
    param = next(encoder.parameters(), None)
    if param is not None:
        mlm.to(dtype=param.dtype)
    base = getattr(encoder, "base_model", None)  # BertForSequenceClassification -> its BertModel
    base = encoder if base is None else base
    missing, _unexpected = mlm.base_model.load_state_dict(base.state_dict(), strict=False)
    if missing:
        raise UserError(f"splade_from_encoder: the encoder {type(encoder).__name__} lacks weights the masked-LM "
                        f"model {type(mlm).__name__} needs: {', '.join(sorted(missing)[:5])}")
    _tie_decoder(mlm)
    _lexical_head_init(mlm)
    mlm.potstill_new_head = True
    if param is not None:
        mlm.to(device=param.device)
    mlm.train(encoder.training)
    return mlm


def _load_masked_lm(path: str | os.PathLike) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    from potstill.students.loading import resolve_model_path

    folder = resolve_model_path(str(path), field="splade_from_encoder source")
    if not Path(folder).exists():
        raise UserError(f"splade_from_encoder: model folder not found: {folder} (expected a local folder saved "
                        f"with save_pretrained, or builtin:minilm)")
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"splade_from_encoder: cannot load a masked-LM model from {folder}: {exc}") from None
    prefix = getattr(mlm, "base_model_prefix", "")
    lost = sorted(k for k in info.get("missing_keys", ()) if prefix and k.startswith(prefix + "."))
    if lost:
        raise UserError(f"splade_from_encoder: {folder} lacks encoder weights ({', '.join(lost[:5])}); expected a "
                        f"checkpoint of the same architecture as its config.json")
    if info.get("missing_keys"):  # the checkpoint had no MLM head: it was initialised by from_pretrained
        _tie_decoder(mlm)
        _lexical_head_init(mlm)
        mlm.potstill_new_head = True
    return mlm


def splade_from_encoder(source: str | os.PathLike | nn.Module, *, tokenizer: Any = None) -> SpladeEncoder:
    """A `SpladeEncoder` from a checkpoint folder (or "builtin:minilm") or an already-built model.

    * A checkpoint with an MLM head (a `*ForMaskedLM` folder) loads as is with `AutoModelForMaskedLM`.
    * A plain encoder checkpoint without one (e.g. all-MiniLM-L6-v2, a `BertModel`) loads its encoder weights
      into the matching `*ForMaskedLM`; the MLM head is NEW: its decoder is tied to the input word embeddings
      (the encoder's own vocabulary matrix), and it starts as a lexical matcher (`_lexical_head_init`: identity
      transform, decoder bias 6 σ below an unrelated term's logit), so the first weights are the text's own
      tokens and a few neighbours, not noise.
    * An `nn.Module`: a `*ForMaskedLM` is wrapped as is (shared, not copied); a plain encoder (`BertModel`, a
      student from `layers_from_teacher`, …) gets the same treatment as a plain checkpoint: a new `*ForMaskedLM`
      built from a copy of its config, the encoder weights copied in (the pooler, which the MLM model lacks, is
      dropped), decoder tied, lexical head init, same dtype / device / train mode.
    * A `SpladeEncoder` is returned as is.

    `tokenizer`, when given, is checked against the model: its `len(tokenizer)` ids must fit in the MLM
    vocabulary (config.vocab_size), else the term weights could not be indexed by token id. Defaults: none.
    """
    if isinstance(source, SpladeEncoder):
        encoder = source
    elif isinstance(source, (str, os.PathLike)):
        encoder = SpladeEncoder(_load_masked_lm(source))
    elif isinstance(source, nn.Module):
        if getattr(source, "config", None) is None:
            raise UserError(f"splade_from_encoder expected a Hugging Face model (with a .config) or a folder, got "
                            f"a {type(source).__name__} without a config")
        encoder = SpladeEncoder(source if _is_masked_lm(source) else _masked_lm_from_base(source))
    else:
        raise UserError(f"splade_from_encoder expected a model folder (str / Path) or a Hugging Face model, got "
                        f"{type(source).__name__}")
    if tokenizer is not None and len(tokenizer) > encoder.vocab_size:
        raise UserError(f"splade_from_encoder: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                        f"has {encoder.vocab_size}; expected the tokenizer the model was trained with")
    return encoder


def sparse_scores(query_weights: Tensor, doc_weights: Tensor) -> Tensor:
    """`(Q, D)` float32 dot products s(q, d) = Σ_t q_t·d_t of `(Q, V)` query and `(D, V)` document weights,
    computed in float32 with autocast disabled. Defaults: none."""
    if query_weights.dim() != 2 or doc_weights.dim() != 2 or query_weights.shape[1] != doc_weights.shape[1]:
        raise ValueError(f"sparse_scores expects (Q, V) and (D, V) weights with the same V, got "
                         f"{tuple(query_weights.shape)} and {tuple(doc_weights.shape)}")
    with torch.autocast(device_type=query_weights.device.type, enabled=False):
        return query_weights.float() @ doc_weights.float().T


@torch.no_grad()
def sparsity_stats(weights: Tensor) -> dict[str, float]:
    """Cheap sparsity numbers of `[..., V]` term weights (rows = leading positions):

    * "active_terms": mean number of weights > 0 per row; "active_terms_max": the largest row's count;
    * "l1": mean Σ_t w_t per row;
    * "expected_flops": Σ_t p_t² with p_t the share of rows where term t is active: the expected number of
      multiplications of a sparse dot product between two random rows (the "FLOPS" figure of the SPLADE papers,
      not the FLOPS regulariser Σ_t (mean_i w_i,t)²).

    All 0.0 for no rows. Defaults: none.
    """
    rows = weights.detach().float().reshape(-1, weights.shape[-1]) if weights.dim() else weights.reshape(1, 1)
    if rows.shape[0] == 0:
        return {"active_terms": 0.0, "active_terms_max": 0.0, "l1": 0.0, "expected_flops": 0.0}
    active = rows > 0
    per_row = active.sum(1).float()
    share = active.float().mean(0)
    return {
        "active_terms": float(per_row.mean()),
        "active_terms_max": float(per_row.max()),
        "l1": float(rows.clamp_min(0).sum(1).mean()),
        "expected_flops": float(share.square().sum()),
    }


def save_sparse_encoder(encoder: SpladeEncoder, tokenizer: Any, path: str | os.PathLike, *, max_seq_length: int,
                        query_idf: Tensor | None = None) -> Path:
    """Write a sentence-transformers `SparseEncoder` folder to `path`, atomically (`potstill.io.atomic_dir`).

    Without `query_idf`: `Transformer(transformer_task="fill-mask")` (the ST 6.x successor of `MLMTransformer`)
    + `SpladePooling(pooling_strategy="max", activation_function="relu")`, i.e. max-pool log(1 + ReLU(logits))
    over the attention mask, the same vectors as `SpladeEncoder.forward`, for queries and documents alike.

    With `query_idf` (`(V,)`, V = config.vocab_size): an inference-free model, a `Router` whose "document" route
    (also the default route of plain `encode`) is the two modules above and whose "query" route is a frozen
    `SparseStaticEmbedding` holding ReLU(idf) with the special tokens at 0, so `encode_query` gives
    `inference_free_query(..., special_ids=tokenizer.all_special_ids)`. Similarity: dot.

    `max_seq_length` truncates documents (and queries) to the tokens the student saw in training; it must not
    exceed config.max_position_embeddings. ``SparseEncoder(str(path))`` loads the folder without potstill.
    A tokenizer without a pad token gets its EOS token as pad token (in the saved copy only). Defaults: none.
    """
    if not isinstance(encoder, SpladeEncoder):
        raise UserError(f"save_sparse_encoder expected a SpladeEncoder (see splade_from_encoder), got "
                        f"{type(encoder).__name__}")
    if tokenizer is None:
        raise UserError("save_sparse_encoder needs the tokenizer the encoder was trained with")
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1
            or (limit is not None and max_seq_length > limit)):
        raise UserError(f"save_sparse_encoder: max_seq_length must be a positive int"
                        f"{f' ≤ max_position_embeddings = {limit}' if limit is not None else ''}, "
                        f"got {max_seq_length!r}")
    vocab = encoder.vocab_size
    if query_idf is not None and tuple(query_idf.shape) != (vocab,):
        raise UserError(f"save_sparse_encoder: query_idf must have shape ({vocab},), one weight per vocabulary id "
                        f"of the encoder, got {tuple(query_idf.shape)}")
    if len(tokenizer) > vocab:
        raise UserError(f"save_sparse_encoder: the tokenizer has {len(tokenizer)} tokens but the encoder's "
                        f"vocabulary has {vocab}; expected the tokenizer the encoder was trained with")
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import (
        Router,
        SparseStaticEmbedding,
        SpladePooling,
        Transformer,
    )

    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.hf.", suffix=".tmp", dir=path.parent) as staging:
        encoder.mlm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, transformer_task="fill-mask", max_seq_length=max_seq_length)
        document = [transformer, SpladePooling(pooling_strategy="max", activation_function="relu",
                                               embedding_dimension=vocab)]
        if query_idf is None:
            modules: list[nn.Module] = document
        else:
            weights = query_weights_for_saving(query_idf, transformer.tokenizer.all_special_ids)
            query = SparseStaticEmbedding(tokenizer=transformer.tokenizer, weight=weights, frozen=True)
            modules = [Router.for_query_document(query_modules=[query], document_modules=document)]
        model = SparseEncoder(modules=modules, device="cpu", similarity_fn_name="dot")
        with atomic_dir(path) as tmp:
            model.save(str(tmp), create_model_card=False)
    return path
