"""`potstill serve`: a local Hugging Face causal LM behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

It is the offline stand-in for a hosted teacher: `EndpointTeacher` talks to it exactly as to OpenAI or vLLM,
and its fault injection (a seeded fraction of requests failed with a chosen status, or delayed) makes retries,
back-off and resume testable on one machine.

Routes (all under /v1):
- `GET /models`: the one served model.
- `POST /chat/completions`: `messages` go through the tokenizer's chat template with the generation prompt
  (tokenized without adding special tokens, as `apply_chat_template` does); a tokenizer without a template
  gets "role: content" lines followed by "assistant:". Content may be a string or a list of text parts.
- `POST /completions`: a `prompt` string, tokenized with the tokenizer's special tokens (e.g. BOS).

Parameters: `model` (optional; another name is a 404), `max_tokens` (chat also reads `max_completion_tokens`;
default 16 for completions and `max_tokens_limit` for chat; capped at `max_tokens_limit` and at the model's
context), `temperature` (0 = greedy, the default is 1 as in OpenAI's API), `top_p` (nucleus: the smallest set of
most likely tokens whose mass reaches top_p), `seed` (sampling from a `torch.Generator` seeded with it is
repeatable), `stop` (a string or list; the text is cut before the first occurrence), `n` (1 only),
log-probs (chat: `logprobs: true` with `top_logprobs: k`, k <= 20; completions: `logprobs: k`, k <= 20).
Log-probs are the model's own `log_softmax` at each generated step, before temperature and top-p (vLLM's
default "raw" log-probs), floored at -9999 as OpenAI does. The end-of-sequence token ends the text and is not
listed among the tokens; `usage.completion_tokens` counts every generated token, EOS included. With a stop
string the tokens listed are those needed to spell the returned text (the last may run into the stop string).
A token's string is `tokenizer.decode([id])` and its `bytes` are that string's UTF-8 bytes.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed request, 401
for a missing or wrong key (when `api_key` is set), 404 for an unknown model or route.

One generation runs at a time (`app.state.generation_lock`, a `threading.Lock`; tests may hold it to pause the
server). Faults are drawn (from `random.Random(seed)`, two draws per generation request, in arrival order) and the
delay is slept before the lock is taken. A reply whose client has gone away by the end of its generation is
logged with status 499 and not sent; so is a request whose client hangs up before its body has arrived (one
warning line on the `potstill.serve` logger, no traceback).

Request log (JSON lines; each request appends one whole line, then the file is closed again): `time` (Unix
seconds), `path`, `body_sha256` (sha256 of the canonical JSON of the body, of its raw bytes when it is not JSON,
null when empty), `status`, `fault`. Headers and keys are never logged.

Parts: `generation` (decoding, `load_model`), `service` (faults, validation, request log, response bodies),
`app` (`create_app`, `LocalServer`).
"""

from .app import LocalServer, create_app
from .generation import BUILTIN_SMOLLM2, LOGPROB_FLOOR, Generation, generate, load_model
from .service import DEFAULT_COMPLETION_TOKENS, FaultSettings

__all__ = ["BUILTIN_SMOLLM2", "DEFAULT_COMPLETION_TOKENS", "LOGPROB_FLOOR", "FaultSettings", "Generation",
           "LocalServer", "create_app", "generate", "load_model"]
