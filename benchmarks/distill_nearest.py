"""DistillNearest / DistillWeighted (Borup et al. 2023) at small scale: choose teachers from a zoo of sources.

The target task: 10 Gaussian classes in a 64-dimensional latent z; the student sees x = tanh(z A) B (96 dims, a
fixed random nonlinear mixing), the sources read z (as a strong pretrained model would). 5 labelled examples per
class (L), 2,000 unlabelled (U), 2,000 test. The zoo (no source data; each source is a frozen feature extractor
φ_s = a projection of z onto 10 directions, scaled by 1/4 and passed through tanh):
- `aligned`: the 10 true class-mean directions of the latent;
- `half-a` / `half-b`: the mean directions of classes 0–4 / 5–9, plus 5 random directions;
- `noisy`: the true directions mixed with as much random direction;
- `unrelated`: 10 random directions.
Each source's target head h_s is a logistic regression fit on φ_s(L); sources are scored by the cross-validated
probe accuracy on L (`potstill.teachers.zoo.probe_score`; `--metric h_score` for the H-score). The student is an
MLP (32 → 64 → 10 for the target, plus one KD head per source) trained with CE on L + Σ_s w_s KL(h_s ‖ head_s) on
U (`potstill.losses.multi_teacher`), and predicts with its target head.

The paper's claims checked here (methods-b §22's CPU check), 3 seeds:
1. the score ranks the aligned source first;
2. DistillNearest beats distilling from a randomly chosen source (the mean over the other sources);
3. with a zoo where no source covers every class (half-a, half-b, unrelated), DistillWeighted beats Nearest.
Rows: labels only (CE on L), each single source, Nearest, Weighted.

Usage: python benchmarks/distill_nearest.py [--seeds 0 1 2] [--metric probe|h_score] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from potstill.losses.multi_teacher import weighted_multi_teacher_kl  # noqa: E402
from potstill.teachers.zoo import ZooSource, nearest, score_sources, similarity_weights  # noqa: E402

CLASSES, LATENT, DIM, PER_CLASS, UNLABELLED, TEST = 10, 64, 96, 5, 2000, 2000
SEPARATION = 0.7


def target_task(seed: int) -> dict[str, torch.Tensor]:
    """Latent z = μ_y + noise (LATENT dims); the student sees x = tanh(z A) B, a fixed random nonlinear mixing of
    z into DIM dims, while the sources (pretrained models, in effect) read z itself."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, LATENT, generator=g) * SEPARATION
    mix_a = torch.randn(LATENT, 64, generator=g) * 1.5 / LATENT**0.5
    mix_b = torch.randn(64, DIM, generator=g) / 8.0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % CLASSES
        z = means[y] + torch.randn(n, LATENT, generator=g)
        return torch.tanh(z @ mix_a) @ mix_b, z, y

    xl, zl, yl = draw(CLASSES * PER_CLASS)
    xu, zu, _ = draw(UNLABELLED)
    xt, zt, yt = draw(TEST)
    return {"means": means, "xl": xl, "zl": zl, "yl": yl, "xu": xu, "zu": zu, "xt": xt, "zt": zt, "yt": yt}


def zoo(means: torch.Tensor, seed: int) -> list[ZooSource]:
    g = torch.Generator().manual_seed(seed + 1000)

    def unit(m: torch.Tensor) -> torch.Tensor:
        return m / m.norm(dim=1, keepdim=True)

    def rand(k: int) -> torch.Tensor:
        return unit(torch.randn(k, LATENT, generator=g))

    true = unit(means)
    directions = {
        "aligned": true,
        "half-a": torch.cat([true[:5], rand(5)]),
        "half-b": torch.cat([true[5:], rand(5)]),
        "noisy": unit(true + 1.0 * rand(CLASSES)),
        "unrelated": rand(CLASSES),
    }
    return [ZooSource(name, (lambda z, d=d: torch.tanh(z @ d.T / 4.0))) for name, d in directions.items()]


class Student(nn.Module):
    def __init__(self, kd_heads: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU())
        self.target = nn.Linear(64, CLASSES)
        self.heads = nn.ModuleList(nn.Linear(64, CLASSES) for _ in range(kd_heads))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.trunk(x)
        return self.target(h), [head(h) for head in self.heads]


def train_student(task: dict, sources: list[ZooSource], weights: torch.Tensor | None, seed: int,
                  steps: int = 400) -> float:
    torch.manual_seed(seed)
    student = Student(len(sources))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=1e-2)
    teacher_u = [s.teacher_logits(task["zu"]) for s in sources]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, UNLABELLED, (128,), generator=g)
        logits_l, _ = student(task["xl"])
        loss = nn.functional.cross_entropy(logits_l, task["yl"])
        if sources:
            assert weights is not None
            _, heads_u = student(task["xu"][idx])
            loss = loss + weighted_multi_teacher_kl(heads_u, [t[idx] for t in teacher_u], weights, temperature=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((student(task["xt"])[0].argmax(-1) == task["yt"]).float().mean())


def one_seed(seed: int, metric: str) -> dict[str, float | str]:
    task = target_task(seed)
    sources = zoo(task["means"], seed)
    for s in sources:
        s.fit_head(task["zl"], task["yl"].tolist())
    scores = score_sources(sources, task["zl"], task["yl"].tolist(), metric=metric, seed=seed)
    row: dict[str, float | str] = {f"score/{s.name}": a for s, a in zip(sources, scores, strict=True)}
    row["ranked_first"] = sources[nearest(scores)].name
    for s in sources:  # the source's own target head on the test set (it reads the latent)
        row[f"teacher head/{s.name}"] = float((s.teacher_logits(task["zt"]).argmax(-1) == task["yt"]).float().mean())
    row["labels only"] = train_student(task, [], None, seed)
    for s in sources:
        row[f"single/{s.name}"] = train_student(task, [s], torch.ones(1), seed)
    best = sources[nearest(scores)]
    row["nearest (full zoo)"] = row[f"single/{best.name}"]
    row["random source (mean of the others)"] = statistics.mean(
        float(row[f"single/{s.name}"]) for s in sources if s is not best)
    row["weighted (full zoo)"] = train_student(task, sources, similarity_weights(scores), seed)
    partial = [s for s in sources if s.name in ("half-a", "half-b", "unrelated")]
    partial_scores = [scores[sources.index(s)] for s in partial]
    row["nearest (no aligned source)"] = row[f"single/{partial[nearest(partial_scores)].name}"]
    row["weighted (no aligned source)"] = train_student(task, partial, similarity_weights(partial_scores), seed)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--metric", choices=["probe", "h_score"], default="probe")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [one_seed(seed, args.metric) for seed in args.seeds]
    print(f"ranked first ({args.metric}):", ", ".join(str(r["ranked_first"]) for r in rows))
    print("| row | test accuracy (mean ± std over seeds) |\n|---|---|")
    for key in rows[0]:
        if key == "ranked_first":
            continue
        values = [float(r[key]) for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {key} | {statistics.mean(values):.3f} ± {spread:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"metric": args.metric, "seeds": args.seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
