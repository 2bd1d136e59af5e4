"""Claim check (issue #21 §9): the per-step optimal ground-truth weight α* of iterated self-distillation.

Borup & Andersen (NeurIPS 2021) show, for kernel ridge regression, that self-distillation without labels (α = 0)
keeps strengthening the regularisation until the fit collapses towards 0, that refitting the labels alone (α = 1)
gains nothing, and that mixing the labels back in with a well-chosen α per step beats both. Check, with
`potstill.train.self_distillation`:

- Data: x ~ U(−2, 2), f(x) = sin(2x) + x/2, labels y = f(x) + N(0, 0.3²). `--n` training points, 200 held-out
  points (noisy labels: α* is estimated on them, as one would in practice), 2,000 test points scored against the
  noise-free f.
- Model: kernel ridge, RBF kernel γ = 30, with each ridge c of `--cs` (fixed, not tuned, as in the paper's
  setting): small c leaves the fit under-regularised (distillation's extra regularisation helps, α* → 0), large c
  over-regularised (α* → 1); between them α* mixes.
- Runs: `--steps` distillation steps after the step-0 fit, with α = 0, α = 1 (plain kernel ridge), α = 0.5, the
  held-out estimate α* per step (`self_distill(alpha="star")`), and the ground-truth α* per step from the closed form
  on the training inputs (`krr_alpha_star`, which knows f: an oracle bound, not a method).

Test MSE against f after the last step, mean ± sample std over seeds (data draws). Usage:
    python benchmarks/claim_teacher_guidance.py [--seeds 0 1 2] [--steps 5] [--n 60] [--cs 0.01 0.1 1]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from potstill.train.self_distillation import KernelRidge, krr_alpha_star, rbf_kernel, self_distill

GAMMA, NOISE = 30.0, 0.3


def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    truth = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 0]
    return x, truth, truth + NOISE * torch.randn(n, generator=g, dtype=torch.float64)


def predict(model: KernelRidge, x: torch.Tensor) -> torch.Tensor:
    return model.predict(x)


def oracle_steps(x: torch.Tensor, y: torch.Tensor, truth: torch.Tensor, steps: int, c: float
                 ) -> tuple[KernelRidge, list[float]]:
    """Self-distillation with each step's ground-truth α* (closed form on the training inputs)."""
    gram = rbf_kernel(x, x, gamma=GAMMA)
    model = KernelRidge.fit(x, y, c=c, gamma=GAMMA)
    alphas = []
    for _ in range(steps):
        previous = model.predict(x)
        alpha = krr_alpha_star(gram, c, y, previous, truth)
        alphas.append(alpha)
        model = KernelRidge.fit(x, alpha * y + (1 - alpha) * previous, c=c, gamma=GAMMA)
    return model, alphas


def run_seed(seed: int, *, steps: int, n: int, c: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    g = torch.Generator().manual_seed(seed)
    x, truth, y = draw(n, g)
    xv, _, yv = draw(200, g)
    xt, ft, _ = draw(2000, g)
    fit = partial(KernelRidge.fit, c=c, gamma=GAMMA)

    def test_mse(model: KernelRidge) -> float:
        return float(((model.predict(xt) - ft) ** 2).mean())

    mse, alphas = {}, {}
    for name, alpha in (("α = 0", 0.0), ("α = 1 (plain KRR)", 1.0), ("α = 0.5", 0.5), ("α* held-out", "star")):
        out = self_distill(fit, predict, x, y, steps=steps, alpha=alpha, x_heldout=xv, y_heldout=yv)
        mse[name] = test_mse(out.models[-1])
        alphas[name] = out.alphas
    model, oracle = oracle_steps(x, y, truth, steps, c)
    mse["α* ground truth (oracle)"] = test_mse(model)
    alphas["α* ground truth (oracle)"] = oracle
    return mse, alphas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--cs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for c in args.cs:
        results = [run_seed(seed, steps=args.steps, n=args.n, c=c) for seed in args.seeds]
        print(f"\nc = {c:g}: kernel ridge self-distillation, {args.steps} steps, {args.n} training points, "
              f"{len(args.seeds)} seeds: test MSE against the noise-free function, mean ± std (per seed); α per step "
              f"(seed {args.seeds[0]})")
        print(f"{'run':<26} {'test MSE':>34}   α per step")
        for name in results[0][0]:
            values = [mse[name] for mse, _ in results]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = f"{statistics.mean(values):.4f} ± {std:.4f} ({', '.join(f'{v:.4f}' for v in values)})"
            print(f"{name:<26} {cell:>34}   {', '.join(f'{a:.2f}' for a in results[0][1][name])}")
        ends = [min(mse["α = 0"], mse["α = 1 (plain KRR)"]) for mse, _ in results]
        wins = sum(mse["α* held-out"] < end for (mse, _), end in zip(results, ends, strict=True))
        ties = sum(mse["α* held-out"] <= end * 1.001 for (mse, _), end in zip(results, ends, strict=True)) - wins
        print(f"α* (held-out) beats both α = 0 and α = 1 in {wins} of {len(results)} seeds, ties the better one "
              f"(within 0.1 %) in {ties}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
