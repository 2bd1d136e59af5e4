"""`potstill align`: CycleAlign cycles of a local causal LM against a black-box ranker behind an endpoint.

Registered in potstill.cli; the work is `potstill.train.cyclealign_cycles.run_cyclealign`. The endpoint client
(`potstill.teachers.endpoint.EndpointTeacher`) brings its response cache (`<out>/cache.sqlite` by default),
retries and concurrency; `<out>/state.json` and the policy weights of the last finished cycle let `--resume`
continue a killed run; the aligned policy is saved with its tokenizer in `<out>/policy/`. An instruct policy (a
tokenizer with a chat template) reads each prompt as a chat turn unless `--no-chat-template`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def align(policy: Annotated[Path, typer.Argument(help="the white-box policy: a Hugging Face causal LM folder")],
          prompts: Annotated[Path, typer.Argument(help="prompts file: JSONL/CSV/TSV/Parquet, or .txt (one per "
                                                  "line)")],
          out: Annotated[Path, typer.Option("--out", help="run folder (state, weights, cache, policy/)")],
          base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint of the black-box ranker",
                                                envvar="POTSTILL_BASE_URL")],
          model: Annotated[str, typer.Option(help="model name sent to the endpoint")],
          column: Annotated[str, typer.Option(help="the prompts' column (a plain string per record)")] = "prompt",
          api_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")]
          = "OPENAI_API_KEY",
          cycles: Annotated[int, typer.Option(min=0, help="cycles to run in all (a resumed run may raise it)")] = 3,
          samples: Annotated[int, typer.Option(min=2, help="responses sampled per prompt and ranked")] = 4,
          max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per sampled response")] = 32,
          epochs: Annotated[int, typer.Option(min=1, help="training passes over a cycle's ranked prompts")] = 1,
          batch_prompts: Annotated[int, typer.Option(min=1, help="prompts per optimizer step")] = 8,
          lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate")] = 1e-5,
          loss: Annotated[str, typer.Option(help="ranking loss: rrhf or pro")] = "rrhf",
          demos: Annotated[int, typer.Option(min=0, help="in-context demos per ranking request")] = 2,
          seed: Annotated[int, typer.Option(help="seed of sampling and shuffling")] = 0,
          chat_template: Annotated[bool, typer.Option("--chat-template/--no-chat-template",
                                                      help="wrap each prompt in the tokenizer's chat template "
                                                      "(a user turn, then the assistant's) when it has one; "
                                                      "--no-chat-template: the plain text")] = True,
          resume: Annotated[bool, typer.Option("--resume", help="continue a killed run")] = False,
          cache: Annotated[Path | None, typer.Option(help="response cache; default <out>/cache.sqlite")] = None,
          concurrency: Annotated[int, typer.Option(min=1, help="requests in flight")] = 4,
          timeout: Annotated[float, typer.Option(min=0.1, help="seconds per request")] = 120.0,
          max_retries: Annotated[int, typer.Option(min=0, help="retries per request on 429/5xx/timeouts")] = 8,
          ) -> None:
    """CycleAlign: a black-box LLM ranks the policy's samples; the agreement with the policy's own ranking trains it.

    Hong et al. 2023: per cycle, sample responses, ask the ranker (with demos of past agreement), keep the longest
    common subsequence of the two rankings, train with the RRHF (or PRO) ranking loss, grow the demo pool."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.errors import UserError
    from potstill.generate import load_prompts
    from potstill.students.save import save_hf_student
    from potstill.teachers.endpoint import EndpointTeacher
    from potstill.train.cyclealign_cycles import CycleAlignConfig, endpoint_ranker, run_cyclealign
    from potstill.ui import console

    records = load_prompts(prompts, column)
    texts = [r[column] for r in records]
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{prompts}: column {column!r} must hold plain strings for align (the policy samples "
                        f"after the prompt text as it is)")
    if not (policy / "config.json").is_file():
        raise UserError(f"{policy}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    lm = AutoModelForCausalLM.from_pretrained(policy)
    config = CycleAlignConfig(cycles=cycles, samples=samples, max_new_tokens=max_new_tokens, epochs=epochs,
                              batch_prompts=batch_prompts, lr=lr, loss_type=loss, demos=demos, seed=seed,
                              chat_template=chat_template)
    teacher = EndpointTeacher(base_url, model, api_key_env=api_key_env, cache=cache or out / "cache.sqlite",
                              concurrency=concurrency, timeout=timeout, max_retries=max_retries)
    with teacher:
        state = run_cyclealign(lm, tokenizer, texts, endpoint_ranker(teacher, seed=seed), config=config,
                               folder=out, resume=resume, log=lambda msg: console.print(msg, highlight=False))
    save_hf_student(lm, tokenizer, out / "policy")
    last = state.history[-1] if state.history else {}
    console.print(f"{state.cycle} cycle(s); last agreement {last.get('agreement', float('nan')):.3f}; policy: "
                  f"{out / 'policy'}", highlight=False)
