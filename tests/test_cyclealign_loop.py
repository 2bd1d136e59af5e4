"""CycleAlign's loop (potstill.train.cyclealign_cycles) on a tiny config-built GPT-2 with a word tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fastapi import Request

from potstill.data.cyclealign import longest_common_subsequence, parse_ranking, rank_by_scores
from potstill.errors import UserError
from potstill.train.cyclealign_cycles import (
    CycleAlignConfig,
    endpoint_ranker,
    response_logps,
    run_cyclealign,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

WORDS = [f"w{k}" for k in range(8)]
PROMPTS = ["w0 w1", "w2 w3", "w4 w5", "w6 w7"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _policy(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=1, pad_token_id=0)).eval()


def _responses(chat: list[dict]) -> list[str]:
    return re.findall(r"^\[\d+\] ?(.*)$", chat[-1]["content"], flags=re.MULTILINE)


def _by_length(chat: list[dict]) -> str:
    """A scripted ranker: longer responses first."""
    texts = _responses(chat)
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i].split()), i))
    return " > ".join(str(i + 1) for i in order)


CONFIG = CycleAlignConfig(cycles=2, samples=3, max_new_tokens=4, batch_prompts=2, lr=1e-2, demos=1, demo_pool=4,
                          min_demo_agreement=0.0)


def test_response_logps_match_a_hand_loop() -> None:
    policy, pad = _policy(), 0
    prompts, responses = [[3, 4], [5]], [[[6, 1], [7]], [[3, 3, 1], [8]]]
    got = response_logps(policy, prompts, responses, pad)
    with torch.no_grad():
        for p, group in enumerate(responses):
            for k, response in enumerate(group):
                ids = torch.tensor([prompts[p] + response])
                log_probs = policy(input_ids=ids).logits[0].log_softmax(-1)
                start = len(prompts[p])
                want = sum(log_probs[start - 1 + t, tok] for t, tok in enumerate(response)) / len(response)
                assert got[p, k].item() == pytest.approx(want.item(), abs=1e-5)


def test_agreement_and_demos_follow_the_rankings(tmp_path) -> None:
    policy, tok = _policy(), _tokenizer()
    seen: list[list[list[dict]]] = []

    def ranker(chats):
        seen.append(chats)
        return [_by_length(c) for c in chats]

    state = run_cyclealign(policy, tok, PROMPTS, ranker, config=CONFIG, folder=tmp_path)
    assert state.cycle == 2 and [row["cycle"] for row in state.history] == [1, 2]
    assert all(row["ranked"] == 4 and row["skipped"] == 0 for row in state.history)
    # cycle 1 asks without demos, cycle 2 with one demo (a user turn and the assistant's ranking)
    assert [len(c) for c in seen[0]] == [2] * 4 and [len(c) for c in seen[1]] == [4] * 4
    demo = state.demos[0]
    assert parse_ranking(_by_length([{"content": "\n".join(f"[{k + 1}] {t}" for k, t in enumerate(demo.responses))}]),
                         len(demo.responses)) is not None
    assert 1 / 3 <= state.history[0]["agreement"] <= 1.0
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["cycle"] == 2 and [p.name for p in tmp_path.glob("policy-cycle*.pt")] == ["policy-cycle2.pt"]


def test_agreement_is_the_lcs_with_the_white_box_ranking() -> None:
    policy, tok = _policy(), _tokenizer()
    checked = []

    def ranker(chats):
        replies = [_by_length(c) for c in chats]
        texts = [_responses(c) for c in chats]
        ids = [[tok(t)["input_ids"] + [1] if len(tok(t)["input_ids"]) < 4 else tok(t)["input_ids"] for t in group]
               for group in texts]
        with torch.no_grad():
            white = response_logps(policy, [tok(p)["input_ids"] for p in PROMPTS], ids, 0).tolist()
        for reply, scores in zip(replies, white, strict=True):
            checked.append(len(longest_common_subsequence(parse_ranking(reply, 3), rank_by_scores(scores))) / 3)
        return replies

    state = run_cyclealign(policy, tok, PROMPTS, ranker, config=CycleAlignConfig(cycles=1, samples=3,
                                                                                 max_new_tokens=4, lr=0.0))
    assert state.history[0]["agreement"] == pytest.approx(sum(checked) / len(checked), abs=1e-6)


def test_malformed_replies_and_failures_are_counted_not_fatal() -> None:
    policy, tok = _policy(), _tokenizer()

    def ranker(chats):
        return ["I cannot rank these", RuntimeError("HTTP 500"), "3 > 3 > 1", _by_length(chats[3])]

    state = run_cyclealign(policy, tok, PROMPTS, ranker, config=CycleAlignConfig(cycles=1, samples=3,
                                                                                 max_new_tokens=3))
    row = state.history[0]
    assert (row["ranked"], row["failed"], row["malformed"], row["skipped"]) == (1, 1, 2, 3)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path) -> None:
    tok = _tokenizer()
    straight = _policy()
    run_cyclealign(straight, tok, PROMPTS, lambda chats: [_by_length(c) for c in chats], config=CONFIG,
                   folder=tmp_path / "straight")
    killed = _policy()
    first = CycleAlignConfig(**{**CONFIG.__dict__, "cycles": 1})
    run_cyclealign(killed, tok, PROMPTS, lambda chats: [_by_length(c) for c in chats], config=first,
                   folder=tmp_path / "resumed")
    with pytest.raises(UserError, match="resume"):
        run_cyclealign(_policy(), tok, PROMPTS, _by_length, config=CONFIG, folder=tmp_path / "resumed")
    with pytest.raises(UserError, match="lr"):
        run_cyclealign(_policy(), tok, PROMPTS, _by_length, config=CycleAlignConfig(**{**CONFIG.__dict__, "lr": 1.0}),
                       folder=tmp_path / "resumed", resume=True)
    fresh = _policy(seed=5)  # the weights come from the checkpoint, not from this init
    state = run_cyclealign(fresh, tok, PROMPTS, lambda chats: [_by_length(c) for c in chats], config=CONFIG,
                           folder=tmp_path / "resumed", resume=True)
    assert state.cycle == 2 and len(state.history) == 2
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_endpoint_ranker_passes_texts_and_errors() -> None:
    class Answer:
        def __init__(self, text: str) -> None:
            self.text = text

    class FakeTeacher:
        def __init__(self) -> None:
            self.params: dict = {}

        def chat_many(self, conversations, **params):
            self.params = params
            return [Answer("1 > 2"), RuntimeError("gone")][:len(conversations)]

    teacher = FakeTeacher()
    got = endpoint_ranker(teacher, max_tokens=16, seed=3)([[{"role": "user", "content": "a"}]] * 2)
    assert got[0] == "1 > 2" and isinstance(got[1], RuntimeError)
    assert teacher.params == {"max_tokens": 16, "temperature": 0.0, "seed": 3}


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="target"):
        CycleAlignConfig(target="best")
    with pytest.raises(UserError, match="samples"):
        CycleAlignConfig(samples=1)
    with pytest.raises(UserError, match="prompts"):
        run_cyclealign(_policy(), _tokenizer(), [], _by_length)


def ranker_app(requests: list[dict]):
    """A scripted black-box behind /v1/chat/completions: ranks longer responses first."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        requests.append(body)
        return {"model": "scripted", "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": _by_length(body["messages"])}}], "usage": {}}

    return app


def test_cli_align_runs_resumes_and_reuses_the_cache(tmp_path, capsys) -> None:
    from potstill.cli import main
    from potstill.serve import LocalServer

    _policy().save_pretrained(tmp_path / "base")
    _tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    requests: list[dict] = []
    with LocalServer(ranker_app(requests)) as server:
        args = ["align", str(tmp_path / "base"), str(tmp_path / "prompts.txt"), "--base-url", server.base_url,
                "--model", "scripted", "--samples", "3", "--max-new-tokens", "4", "--lr", "1e-2", "--demos", "1"]
        out = tmp_path / "run"
        assert main([*args, "--out", str(out), "--cycles", "1"]) == 0
        assert len(requests) == 4 and requests[0]["temperature"] == 0.0
        assert main([*args, "--out", str(out), "--cycles", "2"]) == 2  # a run is there: --resume or remove it
        assert "--resume" in " ".join(capsys.readouterr().err.split())
        assert main([*args, "--out", str(out), "--cycles", "2", "--resume"]) == 0
        assert len(requests) == 8 and json.loads((out / "state.json").read_text())["cycle"] == 2
        assert (out / "policy" / "config.json").exists() and (out / "policy" / "tokenizer.json").exists()
        # a run killed after its ranker answered asks nothing again: the same chats come from the cache
        again = tmp_path / "again"
        assert main([*args, "--out", str(again), "--cycles", "1", "--cache", str(out / "cache.sqlite")]) == 0
        assert len(requests) == 8


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


def _chat_tokenizer():
    """The word tokenizer with the chat markers as special tokens (ids 11, 12) and a chat template."""
    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_prompt_ids_follow_the_chat_template_when_there_is_one() -> None:
    from potstill.data.cyclealign import prompt_token_ids

    tok = _chat_tokenizer()
    start, end, unk = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<unk>"])
    assert (start, end, unk) == (11, 12, 2)
    # "<|im_start|>user w0 w1<|im_end|><|im_start|>assistant": the role words are not in the word vocabulary
    assert prompt_token_ids(tok, "w0 w1") == [start, unk, 3, 4, end, start, unk]
    assert prompt_token_ids(tok, "w0 w1", chat_template=False) == [3, 4]
    assert prompt_token_ids(_tokenizer(), "w0 w1") == _tokenizer()("w0 w1")["input_ids"] == [3, 4]


@pytest.mark.parametrize("chat_template", [True, False])
def test_sampling_and_the_ranking_loss_read_the_same_prompt_ids(monkeypatch, chat_template) -> None:
    from potstill.train import cyclealign_cycles

    tok, seen = _chat_tokenizer(), []
    policy = _policy()
    policy.resize_token_embeddings(len(tok), mean_resizing=False)
    original_logps, original_generate = cyclealign_cycles.response_logps, policy.generate

    def logps(model, prompt_ids, responses, pad):
        seen.append(("loss", [list(p) for p in prompt_ids]))
        return original_logps(model, prompt_ids, responses, pad)

    def generate(inputs, **kwargs):
        seen.append(("sample", [inputs[0].tolist()]))
        return original_generate(inputs, **kwargs)

    monkeypatch.setattr(cyclealign_cycles, "response_logps", logps)
    monkeypatch.setattr(policy, "generate", generate)
    config = CycleAlignConfig(cycles=1, samples=2, max_new_tokens=2, batch_prompts=4, demos=0,
                              chat_template=chat_template)
    run_cyclealign(policy, tok, PROMPTS[:2], lambda chats: [_by_length(c) for c in chats], config=config)
    wanted = [[11, 2, 3, 4, 12, 11, 2], [11, 2, 5, 6, 12, 11, 2]] if chat_template else [[3, 4], [5, 6]]
    assert [ids for kind, ids in seen if kind == "sample"] == [[w] for w in wanted]
    # the policy's own ranking, then training (prompts shuffled)
    assert [sorted(ids) for kind, ids in seen if kind == "loss"] == [wanted, wanted]


def test_cli_no_chat_template_reaches_the_loop(tmp_path, monkeypatch) -> None:
    from potstill.cli import main
    from potstill.data.cyclealign import CycleAlignState
    from potstill.train import cyclealign_cycles

    _policy().save_pretrained(tmp_path / "base")
    _chat_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    configs = []
    monkeypatch.setattr(cyclealign_cycles, "run_cyclealign",
                        lambda *args, config, **kwargs: configs.append(config) or CycleAlignState())
    args = ["align", str(tmp_path / "base"), str(tmp_path / "prompts.txt"), "--base-url", "http://127.0.0.1:9/v1",
            "--model", "m", "--out", str(tmp_path / "run")]
    assert main(args) == 0 and main([*args, "--no-chat-template"]) == 0
    assert [c.chat_template for c in configs] == [True, False]
