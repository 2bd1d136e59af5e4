"""CycleAlign (issue #21 §4) against single-ranker baselines: a tiny GPT-2 policy and a noisy scripted black-box.

Hong et al. 2023 claim that the agreement between a black-box ranker and the white-box policy's own ranking,
used as the ranking loss's label and as new in-context demos, makes the agreement and the policy's reward rise over
cycles, beyond what one ranker's ranking gives. Small-scale check on a synthetic task:

- Text: words w0 … w15. A prompt is 4 distinct words and a ':' ("w3 w9 w0 w12 :"); a response is words, then EOS.
  Hidden reward (the black-box's scoring rule, never shown to the policy): r = (number of distinct "good" words,
  the even ones w0, w2, …, w14, in the response) / 4 − 0.25 · (number of words beyond the fourth); 1 is best, a
  uniform random 4-word answer ≈ 0.46. The rule is a style preference: it does not depend on the prompt. (A
  prompt-conditioned rule, the first prompt word picking the good half, was tried first: in this budget no row
  learned it, not even SFT on the noise-free top sample.)
- Policy: GPT-2 built from a config (2 layers, width 64), pre-trained by SFT (`--sft-steps`) on 4-word responses of
  uniformly random words, so it knows the format and its samples vary, but not the rule.
- Black-box: a Python function behind the ranking chat (`potstill.data.cyclealign.ranking_messages`): it reads the
  query and responses from the chat text and answers "2 > 1 > 4 > 3", ranking by r + N(0, σ²) with
  σ = `--noise` / (1 + `--demo-gain` · demos in the chat) (in-context demos make it a better ranker: the paper's
  premise, *simulated* here, so row (a−) is CycleAlign with demos that do not help), and a malformed reply with
  probability 0.05 (skipped and counted by the loop).
- Rows, each `--cycles` cycles of n = 4 samples on the same 64 train prompts, same lr and epochs:
  (a) CycleAlign: RRHF on the LCS agreement, 2 demos a chat from the pool;
  (a−) the same without demos (agreement label only);
  (b) RRHF on the black-box's whole ranking, no demos; (c) SFT on the black-box's top sample (best-of-n), no
  demos; (d) no training (the SFT policy).
- Score: the mean hidden reward of 8 samples (temperature 1) on each of 64 HELD-OUT prompts (never trained on),
  after every cycle; the agreement rate |LCS| / n of each cycle (before its training step); and the white-box's
  own ranking accuracy on those held-out samples: the share of answer pairs of one prompt with unequal hidden
  rewards that the policy's length-normalised log-prob orders the same way (0.5 = no better than chance). The
  agreement rate counts the black-box's noise and its order among equal-reward answers, which the policy cannot
  match; the ranking accuracy does not.

Mean ± sample std over seeds. Usage:
    python benchmarks/cyclealign.py [--seeds 0 1 2] [--cycles 4] [--epochs 4] [--lr 2e-3] [--noise 0.3]
                                    [--demo-gain 1.0]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import re
import statistics
import time
from dataclasses import replace

import torch

from potstill.train.cyclealign_cycles import CycleAlignConfig, response_logps, run_cyclealign

WORDS = [f"w{k}" for k in range(16)]
PROMPT_WORDS, RESPONSE_WORDS = 4, 4
ROWS = {"(a) CycleAlign": {"target": "agreement", "demos": 2},
        "(a-) agreement, no demos": {"target": "agreement", "demos": 0},
        "(b) RRHF, black-box ranking": {"target": "black_box", "demos": 0},
        "(c) SFT on black-box top": {"target": "black_box_top", "demos": 0}}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", ":", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


GOOD = set(WORDS[::2])


def hidden_reward(query: str, response: str) -> float:
    """The black-box's hidden rule (module docstring); the query does not enter it."""
    words = response.split()
    return len(GOOD & set(words)) / RESPONSE_WORDS - 0.25 * max(0, len(words) - RESPONSE_WORDS)


def make_prompts(rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    prompts: list[str] = []
    while len(prompts) < count:
        prompt = " ".join(rng.sample(WORDS, PROMPT_WORDS)) + " :"
        if prompt not in exclude and prompt not in prompts:
            prompts.append(prompt)
    return prompts


def policy_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 4, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=1, pad_token_id=0))


def pretrain(model, tok, prompts: list[str], *, steps: int, seed: int, batch: int = 32):
    """SFT on 4-word responses of uniformly random words."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows, starts = [], []
        for prompt in rng.choices(prompts, k=batch):
            answer = [rng.choice(WORDS) for _ in range(RESPONSE_WORDS)]
            ids = tok(prompt)["input_ids"]
            starts.append(len(ids))
            rows.append(ids + tok(" ".join(answer))["input_ids"] + [tok.eos_token_id])
        ids = torch.tensor(rows)
        labels = ids.clone()
        for k, start in enumerate(starts):
            labels[k, :start] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def heldout_scores(model, tok, prompts: list[str], *, samples: int = 8, seed: int = 1234) -> dict[str, float]:
    """Mean hidden reward of `samples` sampled answers per held-out prompt, and the white-box's ranking quality:
    the share of same-prompt answer pairs with different rewards that its length-normalised log-prob orders
    like the reward."""
    torch.manual_seed(seed)
    total, right, pairs = 0.0, 0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            inputs = torch.tensor([ids])
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, top_k=0,
                                 max_new_tokens=RESPONSE_WORDS + 2, num_return_sequences=samples,
                                 pad_token_id=0, eos_token_id=tok.eos_token_id)
            answers = []
            for row in out[:, len(ids):].tolist():
                answers.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
            rewards = [hidden_reward(prompt, tok.decode(a, skip_special_tokens=True)) for a in answers]
            logps = response_logps(model, [ids], [answers], 0)[0].tolist()
            total += sum(rewards)
            for i, j in itertools.combinations(range(samples), 2):
                if rewards[i] != rewards[j]:
                    pairs += 1
                    right += (rewards[i] > rewards[j]) == (logps[i] > logps[j])
    return {"reward": total / (len(prompts) * samples), "white_box_accuracy": right / pairs if pairs else 0.5}


def mock_black_box(*, noise: float, demo_gain: float, seed: int, malformed: float = 0.05):
    """The scripted ranker: reads the chat's text, ranks by the hidden reward plus Gaussian noise."""
    rng = random.Random(seed)

    def rank(chats: list[list[dict]]) -> list[str]:
        replies = []
        for chat in chats:
            request = chat[-1]["content"]
            query = re.search(r"^Query: (.*)$", request, flags=re.MULTILINE).group(1)
            texts = re.findall(r"^\[\d+\] ?(.*)$", request, flags=re.MULTILINE)
            demos = sum(m["role"] == "assistant" for m in chat)
            sigma = noise / (1 + demo_gain * demos)
            noisy = [hidden_reward(query, t) + rng.gauss(0.0, sigma) for t in texts]
            order = sorted(range(len(texts)), key=lambda i: -noisy[i])
            replies.append("I would rather not say." if rng.random() < malformed
                           else " > ".join(str(i + 1) for i in order))
        return replies

    return rank


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    tok = tokenizer()
    train = make_prompts(rng, 64, set())
    heldout = make_prompts(rng, 64, set(train))
    sft_prompts = make_prompts(rng, 256, set(heldout))
    base = pretrain(policy_model(seed), tok, sft_prompts, steps=args.sft_steps, seed=seed)
    config = CycleAlignConfig(cycles=args.cycles, samples=4, max_new_tokens=RESPONSE_WORDS + 2,
                              epochs=args.epochs, batch_prompts=8, lr=args.lr, demo_pool=16,
                              min_demo_agreement=0.75, seed=seed)
    measure = lambda cycle, model: heldout_scores(model, tok, heldout)  # noqa: E731
    histories = {"(d) no training": [{"cycle": 0, **measure(0, base)}]}
    for name, options in ROWS.items():
        started = time.perf_counter()
        ranker = mock_black_box(noise=args.noise, demo_gain=args.demo_gain, seed=seed)
        state = run_cyclealign(copy.deepcopy(base), tok, train, ranker, config=replace(config, **options),
                               after_cycle=measure)
        histories[name] = state.history
        print(f"seed {seed} {name}: " + ", ".join(f"c{r['cycle']} r={r['reward']:.3f}"
                                                  + (f" agr={r['agreement']:.2f}" if "agreement" in r else "")
                                                  for r in state.history)
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return histories


def _cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.3, help="black-box ranking noise σ without demos")
    parser.add_argument("--demo-gain", type=float, default=1.0, help="σ / (1 + gain · demos); 0 = demos do not help")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    per_seed = [run_seed(seed, args) for seed in args.seeds]
    names = list(per_seed[0])
    print(f"\nheld-out hidden reward (64 prompts × 8 samples) after each cycle; {len(args.seeds)} seeds, "
          f"noise σ {args.noise}, demo gain {args.demo_gain}; mean ± std")
    print(f"{'row':<30}" + "".join(f"{'cycle ' + str(c):>16}" for c in range(args.cycles + 1)))
    for name in names:
        cells = []
        for c in range(args.cycles + 1):
            values = [h[c]["reward"] for h in (s[name] for s in per_seed) if c < len(h)]
            cells.append(_cell(values) if values and (c == 0 or name != "(d) no training") else "")
        print(f"{name:<30}" + "".join(f"{cell:>16}" for cell in cells))
    print("\nagreement rate |LCS| / n per cycle (train prompts, before the cycle's training); mean ± std")
    print(f"{'row':<30}" + "".join(f"{'cycle ' + str(c):>16}" for c in range(1, args.cycles + 1)))
    for name in names[1:]:
        cells = [_cell([s[name][c]["agreement"] for s in per_seed]) for c in range(1, args.cycles + 1)]
        print(f"{name:<30}" + "".join(f"{cell:>16}" for cell in cells))
    print("\nwhite-box ranking accuracy on held-out samples (pairs of unequal hidden reward ordered like it by the "
          "policy's normalised log-prob); mean ± std")
    print(f"{'row':<30}" + "".join(f"{'cycle ' + str(c):>16}" for c in range(args.cycles + 1)))
    for name in names:
        cells = [_cell([s[name][c]["white_box_accuracy"] for s in per_seed]) if c < len(per_seed[0][name]) else ""
                 for c in range(args.cycles + 1)]
        print(f"{name:<30}" + "".join(f"{cell:>16}" for cell in cells))
    skipped = sum(r.get("skipped", 0) for s in per_seed for h in list(s.values())[1:] for r in h)
    print(f"\nmalformed black-box replies skipped: {skipped}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
