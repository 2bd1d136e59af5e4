"""A held-out evaluation suite for causal language models: a student beside its teacher on text that is not
the training data (`potstill eval RUN --suite lm`; Python: `run_lm_suite`).

The text: Lee news documents, 20 Newsgroups posts and FreeBSD fortunes (the sources, sizes and licences are
in `potstill.data.lm_suite_sources`); the LM recipes train on BBC News. Four measures:

1. Perplexity per source. The source's texts (each followed by EOS) are concatenated and cut into blocks of
   `block_tokens` (`potstill.data.lm_records.pack`); the first `blocks_per_source` blocks are scored, the same
   tokens for teacher and student. Perplexity = exp(mean over counted tokens of −log p(next token)).
2. Per source, over the same tokens: `kl_to_teacher` = mean per token of KL(p_teacher ‖ p_student) =
   Σ_v p_t(v) (log p_t(v) − log p_s(v)) at temperature 1, and `top1_agreement` = share of positions where the
   student's argmax is the teacher's. Logits are compared in float32 over the tokenizer's ids only.
3. Generation: greedy continuations (`new_tokens`, stopping at EOS) of `prompts_per_source` prompts per source
   (a text's first `prompt_tokens` tokens, texts long enough for the prompt and a reference of `new_tokens`
   tokens). `rougeL_vs_teacher`: ROUGE-L F1 (Lin 2004; longest common subsequence of words, the `rouge-score`
   library's tokenizer: lower case, letters and digits) of the student's continuation against the
   teacher's, averaged over prompts; `rougeL_vs_reference`: each model's against the text's true next tokens.
4. Multiple choice scored by log-likelihood: the option with the highest Σ log p(option tokens | context)
   wins ("accuracy"); "accuracy_norm" divides that sum by the option's length in characters (the
   lm-evaluation-harness's acc / acc_norm). Tasks: "newsgroups-continuation" (which of 4 twelve-word spans
   continues a post's first 40 words; wrong options from other posts) and "chatterbot-qa" (which of 4
   answers answers the question; wrong options are other questions' answers). Chance is 1 / options.

Sizes by default: 3 × 16 blocks × 128 tokens, 24 prompts × 32 new tokens, 2 × 40 items × 4 options (about
6k + 17k scored tokens per model). For SmolLM2-135M and a 7-layer student, `potstill eval --suite lm` took 499
CPU-seconds in all (loading included) on a shared 2-core machine; its wall time on idle cores was not
measured (499 / 2 s ≈ 4.2 min with both cores kept busy). Teacher numbers are in
docs/results.md (section "Held-out LM suite").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from potstill.data.lm_records import pack
from potstill.data.lm_suite_sources import LM_SOURCES, ChoiceItem, continuation_items, qa_items, source_texts
from potstill.errors import UserError
from potstill.eval.lm import EVAL_ROW_CHUNK, exp_or_inf

RawLogits = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
ROUGE_HINT = "pip install rouge-score==0.1.2"


def hf_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Raw `[B, T, V]` logits: a Hugging Face model with the attention mask and no KV cache; any other module
    called on the ids alone."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False) if hasattr(model, "config") else model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def token_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor
               ) -> dict[str, float]:
    """Summed statistics of rows `[N, V]` against `targets` `[N]`: student and teacher NLL, KL(teacher ‖
    student), top-1 agreement and the row count (float32)."""
    log_s = torch.log_softmax(student_logits.float(), -1)
    sums = {"nll": -float(log_s.gather(-1, targets[:, None]).sum()), "tokens": float(targets.numel())}
    if teacher_logits is not None:
        log_t = torch.log_softmax(teacher_logits.float(), -1)
        sums["teacher_nll"] = -float(log_t.gather(-1, targets[:, None]).sum())
        sums["kl"] = float((log_t.exp() * (log_t - log_s)).sum())
        sums["agree"] = float((log_t.argmax(-1) == log_s.argmax(-1)).sum())
    return sums


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference` (rouge-score, no stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError(f"the LM suite's generation measure needs rouge-score; install it with `{ROUGE_HINT}`"
                        ) from None
    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure)


def choice_accuracy(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of items whose highest-scoring option is the true one (ties go to the first option)."""
    if not answers:
        return 0.0
    hits = sum(max(range(len(row)), key=lambda j: (row[j], -j)) == a for row, a in zip(scores, answers, strict=True))
    return hits / len(answers)


class _Runner:
    """Runs models on padded batches of token sequences, `batch_size` at a time, with logits cut to `vocab`."""

    def __init__(self, logits: RawLogits, vocab: int, pad_id: int, batch_size: int) -> None:
        self.raw, self.vocab, self.pad_id, self.batch_size = logits, vocab, pad_id, batch_size

    def logits(self, model: nn.Module, rows: list[list[int]]) -> torch.Tensor:
        """`[B, T, V]` logits (on the CPU) of `rows`, right-padded into one batch."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = self.raw(model, ids.to(device), mask.to(device))
        return out[..., :self.vocab].detach().cpu()

    def token_stats(self, student: nn.Module, teacher: nn.Module | None, examples: list[dict[str, list[int]]]
                    ) -> dict[str, float]:
        """`token_sums` over the counted targets of packed `examples`, one forward per model and batch."""
        total: dict[str, float] = {}
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            s_all = self.logits(student, [ex["input_ids"] for ex in chunk])
            t_all = self.logits(teacher, [ex["input_ids"] for ex in chunk]) if teacher is not None else None
            targets = torch.full(s_all.shape[:2], -100, dtype=torch.long)
            for i, ex in enumerate(chunk):
                targets[i, :len(ex["targets"])] = torch.tensor(ex["targets"], dtype=torch.long)
            rows = (targets != -100).nonzero(as_tuple=True)
            for first in range(0, rows[0].numel(), EVAL_ROW_CHUNK):
                part = tuple(r[first:first + EVAL_ROW_CHUNK] for r in rows)
                sums = token_sums(s_all[part], None if t_all is None else t_all[part], targets[part])
                for key, value in sums.items():
                    total[key] = total.get(key, 0.0) + value
        return total

    def option_logprobs(self, model: nn.Module, sequences: list[tuple[list[int], int]]) -> list[float]:
        """Σ log p of the last `n` tokens of each sequence given the tokens before them, for (ids, n) pairs.
        Sequences run longest first (less padding); only the option's rows are normalised."""
        out = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logits = self.logits(model, [sequences[k][0] for k in chunk])
            for i, k in enumerate(chunk):
                ids, n = sequences[k]
                log_p = torch.log_softmax(logits[i, len(ids) - n - 1:len(ids) - 1].float(), -1)
                out[k] = float(log_p.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
        return out


def _encode(tokenizer: Any, text: str, *, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def perplexity_examples(tokenizer: Any, texts: list[str], *, block_tokens: int, blocks: int
                        ) -> list[dict[str, list[int]]]:
    """The first `blocks` packed blocks of `texts` (each text's tokens, then EOS when the tokenizer has one)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, n_tokens = [], 0
    for text in texts:
        ids = _encode(tokenizer, text) + eos
        sequences.append((ids, [True] * len(ids)))
        n_tokens += len(ids)
        if n_tokens > blocks * block_tokens:
            break
    return pack(sequences, block_tokens)[:blocks]


def generation_prompts(tokenizer: Any, texts: list[str], *, n: int, prompt_tokens: int, new_tokens: int
                       ) -> list[tuple[list[int], str]]:
    """Up to `n` (prompt ids, reference text) pairs: a text's first `prompt_tokens` tokens and the text of the
    `new_tokens` after them, from texts long enough for both."""
    out = []
    for text in texts:
        ids = _encode(tokenizer, text)
        if len(ids) >= prompt_tokens + new_tokens:
            out.append((ids[:prompt_tokens], tokenizer.decode(ids[prompt_tokens:prompt_tokens + new_tokens])))
            if len(out) == n:
                break
    return out


def choice_sequences(tokenizer: Any, items: list[ChoiceItem], *, max_tokens: int) -> list[tuple[list[int], int]]:
    """(context + option ids, option length) per item and option; a long context keeps its last tokens."""
    out = []
    for item in items:
        context = _encode(tokenizer, item.context, special=True)
        for option in item.options:
            ids = _encode(tokenizer, " " + option)[:max_tokens - 1]
            out.append(((context + ids)[-max_tokens:], len(ids)))
    return out


def score_choices(runner: _Runner, model: nn.Module, items: list[ChoiceItem],
                  sequences: list[tuple[list[int], int]]) -> dict[str, float]:
    """accuracy (Σ log p), accuracy_norm (Σ log p per character of the option), chance and n."""
    sums = runner.option_logprobs(model, sequences)
    per_item, per_char, at = [], [], 0
    for item in items:
        row = sums[at:at + len(item.options)]
        per_item.append(row)
        per_char.append([s / max(len(o), 1) for s, o in zip(row, item.options, strict=True)])
        at += len(item.options)
    answers = [item.answer for item in items]
    return {"accuracy": choice_accuracy(per_item, answers), "accuracy_norm": choice_accuracy(per_char, answers),
            "chance": sum(1 / len(item.options) for item in items) / max(len(items), 1), "n": len(items)}


def _greedy(model: nn.Module, prompts: list[list[int]], *, new_tokens: int, pad_id: int, eos_id: int | None,
            batch_size: int) -> list[list[int]]:
    from potstill.data.sampling import SamplingSettings, sample_completions

    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0.0)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out += sample_completions(model, prompts[start:start + batch_size], settings=settings, pad_token_id=pad_id,
                                  eos_token_id=eos_id, seed=0)
    return out


def _perplexity_part(runner: _Runner, models: dict[str, nn.Module], tokenizer: Any, texts: list[str], *,
                     block_tokens: int, blocks: int) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Per model: perplexity on the source's first `blocks` packed blocks; the student also gets kl_to_teacher
    and top1_agreement when there is a teacher. And the source's sizes."""
    examples = perplexity_examples(tokenizer, texts, block_tokens=block_tokens, blocks=blocks)
    teacher = models.get("teacher")
    sums = runner.token_stats(models["student"], teacher, examples)
    n = max(sums["tokens"], 1.0)
    out = {"student": {"perplexity": exp_or_inf(sums["nll"] / n)}}
    if teacher is not None:
        out["teacher"] = {"perplexity": exp_or_inf(sums["teacher_nll"] / n)}
        out["student"].update(kl_to_teacher=sums["kl"] / n, top1_agreement=sums["agree"] / n)
    return out, {"texts": len(texts), "blocks": len(examples), "tokens": int(sums["tokens"])}


def _generation_part(runner: _Runner, models: dict[str, nn.Module], tokenizer: Any,
                     prompts: list[tuple[list[int], str]], *, new_tokens: int
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Per model: mean ROUGE-L of its greedy continuations against the references (and, for the student, the
    teacher's continuations); and the continuations' text."""
    texts = {role: [tokenizer.decode(ids, skip_special_tokens=True) for ids in _greedy(
        m, [p for p, _ in prompts], new_tokens=new_tokens, pad_id=runner.pad_id, eos_id=tokenizer.eos_token_id,
        batch_size=runner.batch_size)] for role, m in models.items()}
    refs = [ref for _, ref in prompts]
    out: dict[str, dict[str, Any]] = {}
    for role in models:
        out[role] = {"rougeL_vs_reference": _mean([rouge_l(o, r) for o, r in zip(texts[role], refs, strict=True)]),
                     "n": len(prompts)}
    if "teacher" in models:
        out["student"]["rougeL_vs_teacher"] = _mean([rouge_l(s, t) for s, t in
                                                     zip(texts["student"], texts["teacher"], strict=True)])
    return out, texts


def run_lm_suite(student: nn.Module, teacher: nn.Module | None, tokenizer: Any, *, logits: RawLogits = hf_logits,
                 sources: Sequence[str] = LM_SOURCES, block_tokens: int = 128, blocks_per_source: int = 16,
                 prompts_per_source: int = 8, prompt_tokens: int = 24, new_tokens: int = 32, choice_items: int = 40,
                 batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Score `student` (and `teacher`, its reference) on the held-out LM suite. Returns
    {"suite": "lm", "teacher": {...}, "student": {...}, "table": rows, "sources": {...}, "settings": {...},
    "examples", "seconds"}; each model's dict has "sources" (per source: perplexity, and for the student with a
    teacher kl_to_teacher and top1_agreement), "generation" and "multiple_choice" (per task). `logits(model,
    ids, mask)` gives raw `[B, T, V]` logits (cut here to the tokenizer's ids). The models run in eval mode
    and get their mode back."""
    from potstill.ui import task_progress

    for name in sources:
        if name not in LM_SOURCES:
            raise UserError(f"unknown LM suite source {name!r}; sources: {', '.join(LM_SOURCES)}")
    start = time.perf_counter()
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    runner = _Runner(logits, len(tokenizer), pad_id, batch_size)
    models = {"teacher": teacher, "student": student} if teacher is not None else {"student": student}
    modes = {role: m.training for role, m in models.items()}
    for m in models.values():
        m.eval()
    result: dict[str, Any] = {role: {"sources": {}, "generation": {}, "multiple_choice": {}} for role in models}
    info: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    texts = {name: source_texts(name) for name in sources}
    items = {"newsgroups-continuation": continuation_items(source_texts("newsgroups"), n_items=choice_items),
             "chatterbot-qa": qa_items(n_items=choice_items)}
    bar = task_progress("LM suite", len(sources) + 1 + len(items)) if progress else contextlib.nullcontext(
        lambda n: None)
    with bar as advance:
        for name in sources:
            tick = time.perf_counter()
            scores, info[name] = _perplexity_part(runner, models, tokenizer, texts[name], block_tokens=block_tokens,
                                                  blocks=blocks_per_source)
            for role, values in scores.items():
                result[role]["sources"][name] = values
            seconds[f"perplexity {name}"] = time.perf_counter() - tick
            advance(1)
        tick = time.perf_counter()
        prompts = [p for name in sources for p in generation_prompts(
            tokenizer, texts[name], n=prompts_per_source, prompt_tokens=prompt_tokens, new_tokens=new_tokens)]
        generation, continuations = _generation_part(runner, models, tokenizer, prompts, new_tokens=new_tokens)
        for role, values in generation.items():
            result[role]["generation"] = values
        seconds["generation"] = time.perf_counter() - tick
        advance(1)
        for task, task_items in items.items():
            tick = time.perf_counter()
            sequences = choice_sequences(tokenizer, task_items, max_tokens=2 * block_tokens)
            for role, m in models.items():
                result[role]["multiple_choice"][task] = score_choices(runner, m, task_items, sequences)
            seconds[f"choice {task}"] = time.perf_counter() - tick
            advance(1)
    for role, m in models.items():
        m.train(modes[role])
    examples = [{"prompt": tokenizer.decode(p), "reference": r, **{role: continuations[role][i] for role in models}}
                for i, (p, r) in enumerate(prompts[:3])]
    return {"suite": "lm", **result, "table": lm_suite_rows(result, list(models)), "sources": info,
            "settings": {"block_tokens": block_tokens, "blocks_per_source": blocks_per_source,
                         "prompts_per_source": prompts_per_source, "prompt_tokens": prompt_tokens,
                         "new_tokens": new_tokens, "choice_items": choice_items},
            "examples": examples, "seconds": round(time.perf_counter() - start, 1),
            "seconds_per_part": {k: round(v, 1) for k, v in seconds.items()}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def lm_suite_rows(result: dict[str, Any], roles: list[str]) -> list[dict[str, Any]]:
    """One row per measure: {measure, on (source, "generation" or task), teacher, student}; None where a model
    has no value, and rows with no value at all left out."""
    student = result["student"]
    keys: list[tuple[str, str, tuple[str, ...]]] = [(m, name, ("sources", name, m)) for name in student["sources"]
            for m in ("perplexity", "kl_to_teacher", "top1_agreement")]
    keys += [(m, "generation", ("generation", m)) for m in ("rougeL_vs_teacher", "rougeL_vs_reference")]
    keys += [(f"choice {m}", task, ("multiple_choice", task, m)) for task in student["multiple_choice"]
             for m in ("accuracy", "accuracy_norm", "chance")]
    rows = []
    for measure, where, path in keys:
        values: dict[str, Any] = {}
        for role in roles:
            value: Any = result[role]
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values[role] = value
        if any(v is not None for v in values.values()):
            rows.append({"measure": measure, "on": where, **values})
    return rows
