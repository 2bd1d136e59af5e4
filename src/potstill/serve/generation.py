"""Decoding for `potstill serve`: one sequence at a time with the KV cache, seeded sampling, stop strings and raw
top log-probs; and `load_model` (a HF folder or builtin:smollm2). See `potstill.serve` for the API it backs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from potstill.errors import UserError

#: OpenAI's floor for the log-prob of a very unlikely token (JSON has no -inf).
LOGPROB_FLOOR = -9999.0
BUILTIN_SMOLLM2 = "builtin:smollm2"


@dataclass
class Generation:
    """What `generate` produced: the text, why it stopped, and per-token (string, log-prob, top list)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pick(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the mass of the tokens before it already reaches top_p (the first always stays).
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _forward_args(model) -> tuple[str, dict]:
    """The KV-cache keyword of `model.forward` (transformers >= 5.2x renamed `past_key_values` to `cache`) and
    `logits_to_keep=1` where supported (only the last position's logits are needed)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def generate(model, tokenizer, prompt_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             top_logprobs: int | None = None) -> Generation:
    """Decode up to `max_tokens` tokens after `prompt_ids` with the KV cache; one sequence, no padding.

    `temperature=0` is greedy; otherwise tokens are drawn from softmax(logits / temperature), nucleus-filtered
    by `top_p`, with a `torch.Generator` seeded by `seed` (a random seed when None). `top_logprobs=None` records
    no log-probs; k >= 0 records each chosen token's log-prob and the k most likely at its step, from the
    untempered log_softmax. Stops at an EOS token (finish "stop"), a stop string (finish "stop"; the text is cut
    before it) or `max_tokens` (finish "length").
    """
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    eos = _eos_ids(model, tokenizer)
    stop = [s for s in (stop or []) if s]
    new_ids: list[int] = []
    lengths: list[int] = []  # len(decode(new_ids[:i + 1])) after each kept token
    steps: list[tuple[str, float, list[tuple[str, float]]]] = []
    finish, text, generated = "length", "", 0
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache_arg, extra = _forward_args(model)
    past = None
    with torch.inference_mode():
        for _ in range(max_tokens):
            out = model(input_ids=inputs, use_cache=True, **{cache_arg: past}, **extra)
            past = out[cache_arg]
            logits = out.logits[0, -1].float()
            token = _pick(logits, temperature, top_p, generator)
            generated += 1
            if token in eos:
                finish = "stop"
                break
            new_ids.append(token)
            if top_logprobs is not None:
                logprobs = torch.log_softmax(logits, dim=-1)
                top = torch.topk(logprobs, min(top_logprobs, logprobs.numel())) if top_logprobs else None
                alts = ([] if top is None else
                        [(tokenizer.decode([i]), max(v, LOGPROB_FLOOR))
                         for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
                steps.append((tokenizer.decode([token]), max(float(logprobs[token]), LOGPROB_FLOOR), alts))
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            lengths.append(len(text))
            cut = _first_stop(text, stop) if stop else None
            if cut is not None:
                text, finish = text[:cut], "stop"
                keep = next((i + 1 for i, n in enumerate(lengths) if n >= cut), len(lengths)) if cut else 0
                steps = steps[:keep]
                break
            inputs = torch.tensor([[token]], dtype=torch.long, device=device)
    return Generation(text=text, finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=generated,
                      tokens=steps)


def load_model(path: str, *, device: str | None = None):
    """(model, tokenizer) from a HF folder, or `builtin:smollm2` (`potstill.assets.smollm2_path`).

    float32, in eval mode, on `device` (default: CUDA when available, else CPU). A missing folder is a
    `UserError`; nothing is downloaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == BUILTIN_SMOLLM2:
        from potstill.assets import smollm2_path

        folder = smollm2_path()
    else:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise UserError(f"model {path}: the folder {what}; expected a Hugging Face model folder (config.json, "
                            f"weights, tokenizer) or {BUILTIN_SMOLLM2}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model {path}: cannot load a causal LM and its tokenizer from {folder} ({err})") from err
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
