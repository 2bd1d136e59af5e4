"""SwiftKV (potstill.students.swiftkv) on tiny Llamas built from configs: the transform, its prefill and decoding,
the frozen originals, and one distillation step through a recipe."""

from __future__ import annotations

import json

import pytest
import torch
from test_causal_lm import make_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.evaluate import evaluate_run
from potstill.students.swiftkv import SwiftKVForCausalLM, prefill_flops, swiftkv_student
from potstill.train import run_recipe


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         initializer_range=0.3, tie_word_embeddings=False, pad_token_id=0))
    with torch.no_grad():  # norm gains away from 1, so that folding them into K/V is tested
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model.eval()


IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41], [7, 7, 30, 2, 11, 4, 19]])


def test_cut_at_depth_is_the_original_model_exactly():
    base = tiny_llama()
    model = SwiftKVForCausalLM(base, cut_layer=4)
    assert model.new_parameters() == []
    assert torch.equal(model(IDS).logits, base(IDS).logits)


def test_own_layers_reproduce_the_original_prefill():
    base = tiny_llama()
    logits, cache = SwiftKVForCausalLM(base, cut_layer=4).prefill(IDS)
    assert torch.allclose(logits, base(IDS).logits[:, -1], atol=1e-5)
    assert len(cache) == 4 and cache[0][0].shape == (2, 2, 7, 4)  # per layer: [B, kv_heads, T, head_dim]


def _manual_last_logits(base: LlamaForCausalLM, model: SwiftKVForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The last token's logits written out head by head: layers < cut are the original's (its hidden states);
    the later layers see keys / values made from x_cut only, and only the last token's query."""
    cut, cfg = model.cut_layer, base.config
    x_cut = base(ids, output_hidden_states=True).hidden_states[cut][0]  # [T, H] entering layer `cut`, row 0
    t, d = ids.shape[1], cfg.hidden_size // cfg.num_attention_heads
    pos = torch.arange(t).float()
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)  # [T, d]

    def rope(x):  # x [T, d]
        return x * ang.cos() + torch.cat([-x[:, d // 2:], x[:, :d // 2]], -1) * ang.sin()

    def rms(x, w):
        return w * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    n = rms(x_cut, model.kv_norm.weight)
    h = x_cut[-1]
    for j, i in enumerate(range(cut, cfg.num_hidden_layers)):
        layer = base.model.layers[i]
        q = model.q_proj[j](rms(h, layer.input_layernorm.weight))
        k, v = model.k_proj[j](n), model.v_proj[j](n)  # [T, kv_heads * d]
        heads = []
        for a in range(cfg.num_attention_heads):
            g = a // (cfg.num_attention_heads // cfg.num_key_value_heads)
            qa = rope(q[a * d:(a + 1) * d].expand(t, d))[-1]  # the last position's rotation
            ka, va = rope(k[:, g * d:(g + 1) * d]), v[:, g * d:(g + 1) * d]
            heads.append(torch.softmax(ka @ qa / d ** 0.5, 0) @ va)
        h = h + layer.self_attn.o_proj(torch.cat(heads))
        h = h + layer.mlp(rms(h, layer.post_attention_layernorm.weight))
    return base.lm_head(rms(h, base.model.norm.weight))


def test_later_layers_use_only_the_cut_state_for_kv():
    base = tiny_llama()
    model = SwiftKVForCausalLM(base, cut_layer=2)
    with torch.no_grad():  # trained-looking new weights, not the initial copies
        for p in model.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
        want = _manual_last_logits(base, model, IDS[:1])
    logits, _ = model.prefill(IDS[:1])
    assert torch.allclose(logits[0], want, atol=1e-5)
    assert torch.allclose(model(IDS[:1]).logits[0, -1], want, atol=1e-5)
    assert not torch.allclose(logits[0], base(IDS[:1]).logits[0, -1], atol=1e-3)  # the transform changes them


def test_prefill_with_right_padding_and_greedy_decoding_match_the_full_forward():
    model = SwiftKVForCausalLM(tiny_llama(), cut_layer=2, across_kv=2)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    logits, _ = model.prefill(IDS, mask)
    full = model(IDS, attention_mask=mask).logits
    assert torch.allclose(logits[0], full[0, 6], atol=1e-5) and torch.allclose(logits[1], full[1, 4], atol=1e-5)
    out = model.generate_greedy(IDS, max_new_tokens=4)
    ids = IDS
    for step in range(4):  # greedy by re-running the whole sequence each time
        nxt = model(ids).logits[:, -1].argmax(-1)
        assert torch.equal(out[:, step], nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)


def test_init_folds_the_norm_gain_and_averages_acrosskv_groups():
    base = tiny_llama()
    model = SwiftKVForCausalLM(base, cut_layer=1, across_kv=2)
    assert model.groups == [[1, 2], [3]]
    layers = base.model.layers
    folded = [layers[i].self_attn.k_proj.weight * layers[i].input_layernorm.weight for i in range(4)]
    assert torch.allclose(model.k_proj[0].weight, (folded[1] + folded[2]) / 2)
    assert torch.allclose(model.k_proj[1].weight, folded[3])
    assert torch.equal(model.q_proj[2].weight, layers[3].self_attn.q_proj.weight)
    assert torch.equal(model.kv_norm.weight, torch.ones(16))
    # one AcrossKV group → one K/V in the cache for layers 1 and 2
    assert len(model.prefill(IDS)[1]) == 1 + 2


def test_only_the_new_weights_train_and_the_teacher_stays_in_eval_mode():
    base = tiny_llama()
    model = swiftkv_student(base, {"cut_layer": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if not n.startswith("base.")}
    assert trainable == {"kv_norm.weight", "q_proj.0.weight", "q_proj.1.weight", "k_proj.0.weight",
                         "k_proj.1.weight", "v_proj.0.weight", "v_proj.1.weight"}
    assert model.training and not base.training
    model(IDS).logits.sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in model.new_parameters())


def test_refusals():
    base = tiny_llama()
    with pytest.raises(UserError, match="cut_layer"):
        swiftkv_student(base, {"cut_layer": 9})
    with pytest.raises(UserError, match="takes cut_layer, across_kv"):
        swiftkv_student(base, {"cut": 2})
    with pytest.raises(UserError, match="across_kv"):
        swiftkv_student(base, {"cut_layer": 2, "across_kv": 0})
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(UserError, match="'gpt2' model; the SwiftKV transform is built for the Llama layout"):
        swiftkv_student(gpt2, {"cut_layer": 1})
    with pytest.raises(UserError, match="init swiftkv takes cut_layer and across_kv; got layers"):
        validate_recipe({"name": "x", "task": "causal_lm", "teacher": {"path": "t"},
                         "student": {"init": "swiftkv", "config": {"layers": 2}}, "data": {"train": "d.jsonl"}})


def test_prefill_flops_by_hand():
    cfg = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)  # head_dim 2: q 4, kv 2
    t = 3  # causal pairs: 6
    per_token = 2 * (4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 6)  # 2·(q + k,v + o + MLP) = 208
    attention = 2 * 2 * 6 * 4  # scores and weighted sums: 96
    head = 2 * 4 * 10
    assert prefill_flops(cfg, t) == 2 * (t * per_token + attention) + head
    # cut 1: layer 1 makes K/V for 3 tokens (2·3·16) and runs q, o, MLP and 3 keys for the last token
    later = 3 * 2 * (2 * 4 * 2) + 2 * (4 * 4 + 4 * 4 + 3 * 4 * 6) + 2 * 2 * 3 * 4
    assert prefill_flops(cfg, t, cut_layer=1) == (t * per_token + attention) + later + head


def test_save_and_load_round_trip(tmp_path):
    model = SwiftKVForCausalLM(tiny_llama(), cut_layer=2, across_kv=2)
    with torch.no_grad():
        model.kv_norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "swiftkv.json").read_text()) == {"cut_layer": 2, "across_kv": 2}
    again = SwiftKVForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_one_distillation_step_through_a_recipe(tmp_path):
    tok = make_tokenizer()
    teacher = tiny_llama(layers=4)
    teacher.resize_token_embeddings(len(tok))
    teacher.config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in ["the cat sat on the mat", "a dog ran far"] * 4))
    r = validate_recipe({
        "name": "swiftkv", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
        "teacher": {"path": str(tmp_path / "teacher")},
        "student": {"init": "swiftkv", "config": {"cut_layer": 2}},
        "data": {"train": {"path": str(data)}, "eval": {"path": str(data), "limit": 2}, "max_length": 16},
        "objectives": [{"name": "forward_kl"}],
        "trainer": {"max_steps": 1, "batch_size": 4, "lr": 1e-2, "num_threads": 1, "log_every": 1},
        "eval": {"throughput": False, "compare_before": True}})
    summary = run_recipe(r)
    saved = tmp_path / "runs" / "swiftkv" / "student"
    assert (saved / "swiftkv.safetensors").is_file()
    again = SwiftKVForCausalLM.from_pretrained(saved)
    original = LlamaForCausalLM.from_pretrained(tmp_path / "teacher")
    # the saved original weights are untouched; the new ones moved
    assert torch.equal(again.base.model.layers[3].mlp.up_proj.weight, original.model.layers[3].mlp.up_proj.weight)
    assert not torch.equal(again.k_proj[0].weight, SwiftKVForCausalLM(original, 2).k_proj[0].weight)
    assert summary["table"][-1]["model"] == "student (after)"
    # `potstill eval` scores the student with the transform on: its rows equal the run's own "after" row
    rows = evaluate_run(tmp_path / "runs" / "swiftkv")
    after = summary["table"][-1]
    for metric in ("perplexity", "kl_to_teacher"):
        assert rows[1][metric] == pytest.approx(after[metric], rel=1e-5), metric
    assert rows[1]["kl_to_teacher"] > 0  # the transform on: not the teacher's own weights
