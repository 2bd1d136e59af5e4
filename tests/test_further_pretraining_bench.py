"""The further pre-training benchmark end to end at toy size (slow: real MiniLM, three runs of 2 steps)."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_benchmark_writes_one_row_per_seed_with_three_arms(tmp_path):
    assets = pytest.importorskip("potstill.assets")
    try:
        assets.minilm_path()
        assets.bbc_news()
    except Exception as err:  # MiniLM and BBC News are optional offline assets
        pytest.skip(f"offline assets missing: {err}")
    bench = load_benchmark("further_pretraining_sd")
    assert bench.main(["--seeds", "0", "--steps", "2", "--ft-epochs", "1", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert set(bench.ARMS) <= set(row)
    assert row["theta0"]["distance"] == 0.0  # θ0 against itself
    assert row["further_pretrained"]["distance"] > 0 and row["self_distilled"]["distance"] > 0
    assert all(0.0 <= row[arm]["probe"] <= 1.0 for arm in bench.ARMS)
    assert row["sd_term_first_last"][0] > 0  # φ ≠ θ0: the self-distillation term is positive from the start


def test_stage0_trains_the_mlm_head_alone(monkeypatch):
    """Stage 0 (`--head-steps`): the head's transform and bias learn; the encoder and the tied word embeddings
    (the decoder) do not move, and the masked-token loss on the training texts falls."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from potstill.assets import minilm_path
    from potstill.data import general

    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["the cat sat on the mat", "a dog ran in the park", "the sun rose over the hills"] * 4
    monkeypatch.setattr(general, "wiki_paragraphs", lambda: texts)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64))
    frozen = {n: p.detach().clone() for n, p in model.bert.named_parameters()}
    head = {n: p.detach().clone() for n, p in model.cls.predictions.named_parameters()
            if not n.startswith("decoder")}

    def masked_loss() -> float:
        enc = tok(texts[:3], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        with torch.no_grad():
            logits = model(**enc).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))

    before = masked_loss()
    bench = load_benchmark("further_pretraining_sd")
    bench.train_mlm_head(model, tok, steps=30, seed=0, batch_size=8, max_length=16, lr=1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.bert.named_parameters())
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert all(not torch.equal(p, head[n]) for n, p in model.cls.predictions.named_parameters() if n in head)
    assert masked_loss() < before - 0.3
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable for the stages after it


@pytest.mark.parametrize("flag", [["--ft-seeds", "0"], ["--head-steps", "-1"], ["--sd-weight", "-2"]])
def test_bad_study_flags_are_refused_before_any_run(flag, tmp_path, capsys):
    bench = load_benchmark("further_pretraining_sd")
    with pytest.raises(SystemExit) as err:
        bench.main([*flag, "--out", str(tmp_path)])
    assert err.value.code == 2
    assert "--ft-seeds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()
