"""Black-box generation against a real local teacher (issue #6 §1–3): `potstill serve` with the real
SmolLM2-135M-Instruct and its fault mode, `potstill generate` over chatterbot questions.

Prints, for one run: prompts, wall time, requests sent, retries, faults the server injected, successful
replies per distinct request body (must be 1), completion tokens per second; then the same command again
(every answer from the cache: zero requests), and the share of rows kept.

Usage: python benchmarks/endpoint_generate.py [--prompts 100] [--fail-rate 0.3] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--fail-rate", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from potstill.assets import chatterbot_pairs
    from potstill.cli import main as cli
    from potstill.serve import FaultSettings, LocalServer, create_app, load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("builtin:smollm2")
    questions = list(dict.fromkeys(q for q, _, _ in chatterbot_pairs()))[:args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
        log, out = tmp / "requests.jsonl", tmp / "data.jsonl"
        app = create_app(model, tok, model_name="smollm2", request_log=log,
                         faults=FaultSettings(fail_rate=args.fail_rate, fail_status=500, seed=0))
        command = ["generate", str(prompts), "--out", str(out), "--model", "smollm2", "--max-tokens",
                   str(args.max_tokens), "--concurrency", "4", "--timeout", "300"]
        with LocalServer(app) as server:
            start = time.perf_counter()
            rc = cli([*command, "--base-url", server.base_url])
            first = time.perf_counter() - start
            lines = [json.loads(x) for x in log.read_text().splitlines()]
            start = time.perf_counter()
            rc2 = cli([*command, "--base-url", server.base_url])
            second = time.perf_counter() - start
            again = [json.loads(x) for x in log.read_text().splitlines()]
        manifest = json.loads((tmp / "data.manifest.json").read_text())
        rows = [json.loads(x) for x in out.read_text().splitlines()]
    ok = Counter(r["body_sha256"] for r in lines if r["status"] == 200)
    faults = sum(r["fault"] for r in lines)
    tokens = sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    print(f"\nprompts {len(questions)}, fail rate {args.fail_rate}, max_tokens {args.max_tokens}, "
          f"exit codes {rc}/{rc2}")
    print(f"first run: {first:.1f} s, {len(lines)} requests ({faults} injected faults), successful replies "
          f"{sum(ok.values())} over {len(ok)} distinct bodies (max per body {max(ok.values())}), "
          f"~{tokens / first:.1f} completion tokens/s")
    print(f"second run: {second:.2f} s, {len(again) - len(lines)} requests, {manifest['from_cache']} answers from "
          f"the cache; rows kept {manifest['kept']}/{manifest['prompts']}")


if __name__ == "__main__":
    main()
