"""Sampling completions for on-policy / sequence-level distillation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.data.sampling import SamplingSettings, _filter_logits, sample_completions


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


class NoGenerate(torch.nn.Module):
    """The same model seen as a plain module (no `generate`), to exercise the fallback loop."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def test_same_seed_same_samples_and_model_mode_restored(tiny_llama):
    prompts = [[5, 6, 7], [8, 9], [10]]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
    tiny_llama.train()
    a = sample_completions(tiny_llama, prompts, settings=settings, pad_token_id=0, eos_token_id=None, seed=1)
    b = sample_completions(tiny_llama, prompts, settings=settings, pad_token_id=0, eos_token_id=None, seed=1)
    c = sample_completions(tiny_llama, prompts, settings=settings, pad_token_id=0, eos_token_id=None, seed=2)
    assert a == b and a != c
    assert [len(x) for x in a] == [6, 6, 6]
    assert tiny_llama.training
    # the caller's RNG stream is untouched
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    sample_completions(tiny_llama, prompts, settings=settings, pad_token_id=0, eos_token_id=None, seed=1)
    assert torch.equal(torch.rand(1), expected)


def test_greedy_generate_equals_plain_loop_and_stops_at_eos(tiny_llama):
    prompts = [[5, 6, 7], [11, 12, 13]]
    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    via_generate = sample_completions(tiny_llama, prompts, settings=greedy, pad_token_id=0, eos_token_id=None,
                                      seed=0)
    via_loop = sample_completions(NoGenerate(tiny_llama), prompts, settings=greedy, pad_token_id=0,
                                  eos_token_id=None, seed=0)
    assert via_generate == via_loop
    eos = via_generate[0][2]  # pretend the third greedy token is EOS: the completion stops there
    for model in (tiny_llama, NoGenerate(tiny_llama)):
        cut = sample_completions(model, prompts[:1], settings=greedy, pad_token_id=0, eos_token_id=eos, seed=0)
        assert cut[0][-1] == eos and eos not in cut[0][:-1] and len(cut[0]) <= 3


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 alone is not enough, 0.5 + 0.3 reaches it
    assert torch.isinf(_filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(_filter_logits(logits, 0, 1.0)).any()
