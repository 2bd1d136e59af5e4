"""Weight interpolation between an embedding student's layer-drop init and its trained weights (issue #15).

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") mixes a fine-tuned model with the model it
started from, θ(a) = (1 − a)·θ₀ + a·θ₁, to keep the starting point's generality. Here θ₀ is the untrained
layer-drop student (all-MiniLM-L6-v2's layers `--layers`, default 0 and 3: the demo's init) and θ₁ a trained
student folder of the same shape; each mix is scored on the general suite (`potstill.eval.suite.run_suite`, with
the teacher as the fidelity reference).

`--alpha-for PREFIX=A` gives the parameters whose names start with PREFIX (e.g. `embeddings.` or
`encoder.layer.1.`) their own a, the same in every mix; the longest matching prefix wins.

Usage: python benchmarks/embedding_interpolation.py STUDENT_DIR [--alphas 0 0.5 0.7 1] [--alpha-for PREFIX=A ...]
       [--json OUT]
Measured: docs/results.md, "General embedding suite" (the interpolation bullet).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from potstill.assets import minilm_path  # noqa: E402
from potstill.eval.suite import cached_encoder, encoder_for, run_suite  # noqa: E402


def layer_drop_student(layers: list[int], max_length: int):
    """all-MiniLM-L6-v2 as a SentenceTransformer keeping only `layers` (the untrained layer-drop init)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    encoder = model[0].auto_model
    encoder.encoder.layer = torch.nn.ModuleList(encoder.encoder.layer[i] for i in layers)
    encoder.config.num_hidden_layers = len(layers)
    model.max_seq_length = max_length
    return model


def interpolated(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], a: float,
                 alpha_for: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """(1 − a)·start + a·end for float tensors, a replaced by `alpha_for[prefix]` for the names starting with the
    longest such prefix; integer buffers (position ids) are taken from `end`."""
    if start.keys() != end.keys():
        raise SystemExit("the student and the layer-drop init have different parameters: check --layers")
    prefixes = sorted(alpha_for or {}, key=len, reverse=True)

    def alpha(name: str) -> float:
        return next(((alpha_for or {})[p] for p in prefixes if name.startswith(p)), a)

    return {k: (1 - alpha(k)) * start[k] + alpha(k) * end[k] if end[k].is_floating_point() else end[k] for k in end}


def _prefix_alpha(text: str) -> tuple[str, float]:
    prefix, sep, value = text.rpartition("=")
    try:
        return prefix, float(value) if sep and prefix else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PREFIX=A (e.g. embeddings.=0), got {text!r}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("student", type=Path, help="a trained layer-drop student (sentence-transformers folder)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.7, 1.0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--alpha-for", type=_prefix_alpha, nargs="+", default=[], metavar="PREFIX=A",
                   help="own a for parameter names starting with PREFIX")
    p.add_argument("--json", type=Path, help="also write every suite result here")
    args = p.parse_args()
    alpha_for = dict(args.alpha_for)
    if any(v != v for v in alpha_for.values()):
        p.error("--alpha-for takes PREFIX=A")
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    teacher = cached_encoder(encoder_for(SentenceTransformer(str(minilm_path()), device="cpu")))
    trained = SentenceTransformer(str(args.student), device="cpu")
    end = {k: v.float() if v.is_floating_point() else v for k, v in trained[0].auto_model.state_dict().items()}
    start = layer_drop_student(args.layers, trained.max_seq_length)[0].auto_model.state_dict()
    rows = {}
    print("| a | " + " | ".join(("classif.", "clustering", "pair", "reranking", "retrieval", "STS", "avg",
                                 "cos→teacher", "recall@10")) + " |\n|" + "---|" * 10, flush=True)
    for a in args.alphas:
        model = layer_drop_student(args.layers, trained.max_seq_length)
        model[0].auto_model.load_state_dict(interpolated(start, end, a, alpha_for))
        result = json.loads(run_suite(encoder_for(model), teacher_encode=teacher, progress=False).to_json())
        rows[str(a)] = result
        types = [result["per_type"][t] for t in ("classification", "clustering", "pair_classification",
                                                 "reranking", "retrieval", "sts")]
        fid = result["fidelity"]
        cells = [*types, result["average"], fid["cosine_to_teacher"], fid["neighbour_recall@10"]]
        print(f"| {a:g} | " + " | ".join(f"{v:.3f}" for v in cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
