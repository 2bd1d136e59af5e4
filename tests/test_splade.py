"""SPLADE-style sparse students: term weights, MLM heads for plain encoders, inference-free queries, IDF, and
sentence-transformers SparseEncoder folders (tiny BERT configs, nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast, GPT2Config, GPT2Model

from potstill.errors import UserError
from potstill.losses.ranking import flops
from potstill.students.splade import (
    SpladeEncoder,
    save_sparse_encoder,
    sparse_scores,
    sparsity_stats,
    splade_from_encoder,
)
from potstill.students.splade_inference_free import idf_from_collection, inference_free_query

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "big", "small", "red", "blue", ".",
    "who", "won", "cup", "final", "team", "after", "extra", "time", "shares", "fell", "bank", "reported",
    "losses", "film", "opens", "next", "friday", "rain", "is", "expected", "north", "tomorrow", "?",
]  # fmt: skip
VOCAB = SPECIALS + WORDS + [f"[unused{i}]" for i in range(120 - len(SPECIALS) - len(WORDS))]
TEXTS = ["the cat sat on the mat .", "who won the cup final ?", "shares fell after the bank reported losses",
         "rain"]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizerFast:
    # transformers 5 takes the vocabulary itself (a `vocab_file=` keyword is silently ignored)
    tok = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)
    assert len(tok) == len(VOCAB) and tok.convert_tokens_to_ids("cat") == VOCAB.index("cat")
    return tok


def _config(**kw) -> BertConfig:
    base = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def _mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    model = BertForMaskedLM(_config()).eval()
    with torch.no_grad():  # a visible share of positive logits, so weights are not all zero
        model.cls.predictions.bias.normal_(0.0, 1.0)
    return model


def _batch(tokenizer, texts=TEXTS, max_length: int = 16):
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def test_weights_are_max_pooled_log1p_relu_of_real_tokens(tokenizer):
    enc = SpladeEncoder(_mlm())
    assert enc.config.vocab_size == len(VOCAB) and isinstance(enc.mlm, BertForMaskedLM)
    batch = _batch(tokenizer)
    with torch.no_grad():
        w = enc(**batch)
        logits = enc.mlm(**batch).logits
    assert w.shape == (len(TEXTS), len(VOCAB)) and w.dtype == torch.float32
    assert (w >= 0).all() and (w > 0).any() and (w == 0).any()
    for b in range(len(TEXTS)):
        real = batch["attention_mask"][b].bool()
        expected = torch.log1p(torch.relu(logits[b, real])).max(0).values
        torch.testing.assert_close(w[b], expected)

    # padding does not change a text's weights: the short text alone equals its row in the padded batch
    alone = _batch(tokenizer, [TEXTS[-1]])
    assert alone["input_ids"].shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(enc(**alone)[0], w[-1], atol=1e-5, rtol=1e-5)
        # an all-padding row gives zeros
        empty = enc(batch["input_ids"][:1], torch.zeros_like(batch["attention_mask"][:1]))
    assert torch.equal(empty, torch.zeros_like(empty))


def test_float32_under_autocast_and_gradients_reach_the_encoder(tokenizer):
    enc = SpladeEncoder(_mlm())
    batch = _batch(tokenizer)
    with torch.no_grad():
        reference = enc(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(**batch)
        scores = sparse_scores(low, low)
    assert low.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=0.1, rtol=0.05)

    enc.train()
    w = enc(**batch)
    loss = sparse_scores(w[:2], w[2:]).sum() + 1e-3 * flops(w)
    loss.backward()
    layer = enc.mlm.bert.encoder.layer[0].attention.self.query.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    assert enc.mlm.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def _same_encoder_weights(mlm: BertForMaskedLM, base: BertModel) -> None:
    inner = mlm.bert.state_dict()
    for key, value in base.state_dict().items():
        if key.startswith("pooler."):
            assert key not in inner  # the MLM model has no pooler
            continue
        assert torch.equal(inner[key], value), key


def test_plain_encoder_gets_a_tied_new_head(tmp_path, tokenizer):
    torch.manual_seed(1)
    base = BertModel(_config()).eval()
    enc = splade_from_encoder(base, tokenizer=tokenizer)
    mlm = enc.mlm
    assert isinstance(mlm, BertForMaskedLM) and not mlm.training
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    _same_encoder_weights(mlm, base)
    assert mlm.bert.embeddings.word_embeddings.weight is not base.embeddings.word_embeddings.weight  # a copy
    with torch.no_grad():
        assert enc(**_batch(tokenizer)).shape == (len(TEXTS), len(VOCAB))

    # the same from a saved folder without an MLM head
    base.save_pretrained(tmp_path / "plain")
    loaded = splade_from_encoder(tmp_path / "plain").mlm
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    _same_encoder_weights(loaded, base)

    # an untied config is tied all the same; a masked-LM model is wrapped, not copied
    untied = BertModel(_config(tie_word_embeddings=False))
    head = splade_from_encoder(untied).mlm
    assert head.get_output_embeddings().weight is head.get_input_embeddings().weight
    ready = _mlm()
    assert splade_from_encoder(ready).mlm is ready

    # a folder with a trained head keeps it
    ready.save_pretrained(tmp_path / "mlm")
    again = splade_from_encoder(str(tmp_path / "mlm")).mlm
    torch.testing.assert_close(again.cls.predictions.bias, ready.cls.predictions.bias)


def test_splade_from_encoder_rejects_wrong_inputs(tmp_path, tokenizer):
    with pytest.raises(UserError, match="Hugging Face model"):
        splade_from_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="no masked-LM"):
        splade_from_encoder(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)))
    with pytest.raises(UserError, match="not found"):
        splade_from_encoder(tmp_path / "missing")
    with pytest.raises(UserError, match="tokenizer has 120 tokens"):
        splade_from_encoder(BertModel(_config(vocab_size=100)), tokenizer=tokenizer)


def test_builtin_minilm_gets_a_head():
    pytest.importorskip("sentence_transformers")
    try:
        from potstill.assets import minilm_path

        minilm_path()
    except UserError:
        pytest.skip("all-MiniLM-L6-v2 asset not installed")
    enc = splade_from_encoder("builtin:minilm")
    assert enc.config.vocab_size == 30522
    assert enc.mlm.get_output_embeddings().weight is enc.mlm.get_input_embeddings().weight
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        w = enc(ids, torch.ones_like(ids))
    assert w.shape == (1, 30522) and (w >= 0).all()
    # the new head starts lexical: the text's own tokens are active, and few others (not ~all 30,522)
    assert (w[0, [7592, 2088]] > 0).all() and int((w > 0).sum()) < 1000


def test_inference_free_query_is_relu_idf_on_distinct_real_tokens():
    idf = torch.linspace(-1.0, 3.0, 10, requires_grad=True)
    ids = torch.tensor([[2, 5, 5, 7, 3, 0], [2, 1, 8, 3, 9, 9]])  # 2 = CLS, 3 = SEP, 0 = PAD
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])  # token 9 of row 1 is padding only
    q = inference_free_query(ids, mask, idf, special_ids=[0, 2, 3])
    relu = torch.relu(idf.detach())
    expected = torch.zeros(2, 10)
    expected[0, [5, 7]] = relu[[5, 7]]  # 5 occurs twice, counted once
    expected[1, [1, 8]] = relu[[1, 8]]  # idf_1 < 0: ReLU gives 0
    assert torch.equal(q, expected) and q.dtype == torch.float32 and not q.requires_grad
    assert q[1, 1] == 0 and q[1, 9] == 0
    with pytest.raises(UserError, match="outside the IDF vector"):
        inference_free_query(ids, mask, idf[:6])
    with pytest.raises(UserError, match=r"shape \(V,\)"):
        inference_free_query(ids, mask, idf[None])


def test_idf_on_a_three_document_toy(tokenizer):
    docs = ["the cat sat on the mat", "the dog ran", "a big cat", ""]  # the empty passage is not counted
    idf = idf_from_collection(tokenizer, docs)
    n = 3

    def formula(df: int) -> float:
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    vocab = tokenizer.get_vocab()
    assert idf.shape == (len(tokenizer),) and idf.dtype == torch.float32
    for word, df in {"the": 2, "cat": 2, "sat": 1, "dog": 1, "a": 1}.items():
        assert idf[vocab[word]].item() == pytest.approx(formula(df), rel=1e-6), word
    assert idf[vocab["blue"]].item() == pytest.approx(formula(0)) == pytest.approx(math.log(2 * n + 2))
    assert all(idf[i] == 0 for i in tokenizer.all_special_ids)
    assert idf[vocab["the"]] < idf[vocab["sat"]] < idf[vocab["blue"]]

    zero = idf_from_collection(tokenizer, iter(docs), unseen="zero", batch_size=2)
    assert zero[vocab["blue"]] == 0 and zero[vocab["cat"]] == idf[vocab["cat"]]
    short = idf_from_collection(tokenizer, docs, max_length=2)  # "sat" is cut from the first passage
    assert short[vocab["sat"]] == pytest.approx(math.log(2 * n + 2))
    assert idf_from_collection(tokenizer, docs, vocab_size=130).shape == (130,)
    with pytest.raises(UserError, match="single string"):
        idf_from_collection(tokenizer, "the cat")
    with pytest.raises(UserError, match="passage 1"):
        idf_from_collection(tokenizer, ["the cat", 3])
    with pytest.raises(UserError, match="at least one passage"):
        idf_from_collection(tokenizer, ["", "[CLS]"])
    with pytest.raises(UserError, match="unseen"):
        idf_from_collection(tokenizer, docs, unseen="mean")


def test_sparse_scores_and_sparsity_stats():
    q = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(sparse_scores(q, d), torch.tensor([[0.5, 3.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="same V"):
        sparse_scores(q, d[:, :2])
    stats = sparsity_stats(torch.cat([q, d]))
    assert stats["active_terms"] == pytest.approx(6 / 4) and stats["active_terms_max"] == 2
    assert stats["l1"] == pytest.approx(6.5 / 4)
    assert stats["expected_flops"] == pytest.approx((3 / 4) ** 2 + (1 / 4) ** 2 + (2 / 4) ** 2)
    assert sparsity_stats(torch.zeros(0, 3))["active_terms"] == 0.0


def _st_dense(embeddings) -> torch.Tensor:
    out = torch.as_tensor(embeddings)
    return (out.to_dense() if out.is_sparse else out).float()


def test_save_plain_sparse_encoder_loads_with_the_same_vectors(tmp_path, tokenizer):
    from sentence_transformers.sparse_encoder import SparseEncoder

    enc = SpladeEncoder(_mlm())
    out = save_sparse_encoder(enc, tokenizer, tmp_path / "splade", max_seq_length=16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    model = SparseEncoder(str(out), device="cpu")
    texts = [*TEXTS, "the big red dog ran far away after the small blue cat on the mat ."]  # > 16 tokens
    assert len(tokenizer(texts[-1])["input_ids"]) > 16
    got = _st_dense(model.encode_document(texts, convert_to_tensor=True, convert_to_sparse_tensor=False))
    with torch.no_grad():
        want = enc(**_batch(tokenizer, texts, max_length=16))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    query = _st_dense(model.encode_query(TEXTS[:1], convert_to_tensor=True, convert_to_sparse_tensor=False))
    torch.testing.assert_close(query[0], want[0], atol=1e-4, rtol=1e-4)

    with pytest.raises(UserError, match="max_seq_length"):
        save_sparse_encoder(enc, tokenizer, tmp_path / "bad", max_seq_length=1000)
    with pytest.raises(UserError, match="SpladeEncoder"):
        save_sparse_encoder(enc.mlm, tokenizer, tmp_path / "bad", max_seq_length=16)


def test_save_inference_free_sparse_encoder(tmp_path, tokenizer):
    from sentence_transformers.sparse_encoder import SparseEncoder

    enc = SpladeEncoder(_mlm(seed=2))
    idf = idf_from_collection(tokenizer, TEXTS[:3])
    idf[tokenizer.get_vocab()["cat"]] = -0.5  # a negative weight is saved as ReLU(idf) = 0
    out = save_sparse_encoder(enc, tokenizer, tmp_path / "inf-free", max_seq_length=16, query_idf=idf)
    assert (out / "router_config.json").exists()
    model = SparseEncoder(str(out), device="cpu")

    queries = ["who won the cup final ?", "the cat sat on the the mat", "blue rain tomorrow"]
    batch = _batch(tokenizer, queries)
    want_q = inference_free_query(batch["input_ids"], batch["attention_mask"], idf,
                                  special_ids=tokenizer.all_special_ids)
    got_q = _st_dense(model.encode_query(queries, convert_to_tensor=True, convert_to_sparse_tensor=False))
    torch.testing.assert_close(got_q, want_q, atol=1e-4, rtol=1e-4)
    assert got_q[1, tokenizer.get_vocab()["cat"]] == 0

    got_d = _st_dense(model.encode_document(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False))
    with torch.no_grad():
        want_d = enc(**_batch(tokenizer, max_length=16))
    torch.testing.assert_close(got_d, want_d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_st_dense(model.similarity(got_q, got_d)), sparse_scores(want_q, want_d),
                               atol=1e-3, rtol=1e-4)
    with pytest.raises(UserError, match="query_idf must have shape"):
        save_sparse_encoder(enc, tokenizer, tmp_path / "bad", max_seq_length=16, query_idf=idf[:10])


def test_fused_max_pool_equals_the_full_logits_path_in_values_and_gradients(tokenizer):
    mlm = _mlm(seed=3).double()
    with torch.no_grad():  # a spread of positive and negative logits, so both ReLU sides are exercised
        mlm.cls.predictions.bias.normal_(0.0, 1.0)
        # no all-zero embedding row ([PAD]'s): its logit is the bias at every token, a tie whose gradient a max
        # gives to one token and amax spreads over all, two valid subgradients
        mlm.get_input_embeddings().weight.add_(1e-3 * torch.randn_like(mlm.get_input_embeddings().weight))
    batch = _batch(tokenizer)
    grads = {}
    for fused in (True, False):
        enc = SpladeEncoder(mlm, fused=fused, chunk_size=2)
        assert enc.fused is fused
        mlm.zero_grad()
        out = enc(**batch)
        (out * torch.linspace(0.5, 2.0, out.shape[1], dtype=out.dtype)).sum().backward()
        grads[fused] = (out.detach(), {n: p.grad.clone() for n, p in mlm.named_parameters() if p.grad is not None})
    (fused_out, fused_grads), (plain_out, plain_grads) = grads[True], grads[False]
    assert torch.allclose(fused_out, plain_out, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert torch.allclose(fused_grads[name], plain_grads[name], atol=1e-8), name


def test_calibrated_head_bias_gives_the_asked_active_terms(tokenizer):
    from potstill.students.splade import calibrate_head_bias

    enc = SpladeEncoder(_mlm(seed=4))
    batch = _batch(tokenizer)
    bias = calibrate_head_bias(enc, batch["input_ids"], batch["attention_mask"], active_terms=10)
    assert torch.allclose(enc.mlm.cls.predictions.bias, torch.full_like(enc.mlm.cls.predictions.bias, bias))
    with torch.no_grad():
        active = (enc(**batch) > 0).sum(1).float()
    assert abs(float(active.median()) - 10) <= 1
    enc.train()
    calibrate_head_bias(enc, batch["input_ids"], batch["attention_mask"], active_terms=5)
    assert enc.training
