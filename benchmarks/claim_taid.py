"""Claim check (issue #16 §3): TAID vs forward KL / reverse KL, on a bimodal toy and on a capacity-gap ladder.

TAID (Shing et al., ICLR 2025) trains the student towards p_t = softmax((1 − t)·sg(z_s) + t·z_t), t rising from
t_start to 1. The paper claims it avoids both the mode collapse of reverse KL and the mode averaging of forward
KL, and that its advantage grows with the teacher–student capacity gap. Both parts below train with potstill's
own losses (`potstill.losses.forward_kl`, `reverse_kl`, `TAID` with its schedule stepped by
`TAID.on_optimizer_step` once per optimizer step), Adam, equal steps for every loss.

Part 1, bimodal toy (methods-a.md §1 (d)). The teacher is a fixed distribution over a 20-token vocabulary, a
0.6 / 0.4 mixture of two discretised Gaussians (σ = 1.2) centred on tokens 4 and 15; almost no mass lies in
the valley (tokens 8–11). The student is a low-capacity, unimodal family, logits_v = a·u + b·u² with
u = (v − 9.5) / 9.5 (two parameters), started as a discretised Gaussian at μ = 8 + 0.3·N(0, 1) (the seed),
σ = 2; Adam, lr 0.05. Reported after `--toy-steps` steps: mass within ±2 tokens of each mode (A = token 4,
B = token 15), valley mass, the student's FKL and RKL to the teacher, its mean and std in tokens.
"Collapsed" = one mode holds < 5 % of the student's mass (the teacher puts ≥ 35 % near each). As TAID's t
reaches 1 its loss is forward KL, so given enough steps in this family it ends where FKL ends.

Part 2, capacity ladder. One teacher, a fixed random MLP 16 → 256 → 256 → 64 whose logits are scaled so that
its mean entropy is about 1.5 nats (an LLM-like, multi-modal next-token shape). Students are 2-hidden-layer
MLPs of decreasing width (`--widths`), trained on fresh x ~ N(0, I) each step (batch 256) for `--steps` steps,
lr 3e-3, with FKL, RKL or TAID (t_start 0.4, α 5e-4, β 0.99: the paper's defaults). Scored on 4,096 held-out x:
KL(teacher ‖ student) and top-1 agreement. "TAID gain" = (KL_FKL − KL_TAID) / KL_FKL.

Mean ± sample std over `--seeds` (student init and data order). Usage:
    python benchmarks/claim_taid.py [--quick] [--seeds 0 1 2] [--widths 128 32 8 4 2] [--steps 1500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from potstill.io import atomic_write_json
from potstill.losses import TAID, forward_kl, reverse_kl

VOCAB = 20
MODES = (4, 15)
MODE_WEIGHTS = (0.6, 0.4)
LOSSES = ("fkl", "rkl", "taid")


def bimodal_teacher_logits(width: float = 1.2) -> Tensor:
    """Log-probabilities of the toy teacher: a 0.6 / 0.4 mixture of discretised Gaussians at tokens 4 and 15."""
    v = torch.arange(VOCAB, dtype=torch.float64)
    mix = sum(w * torch.exp(-((v - m) ** 2) / (2 * width**2)) for w, m in zip(MODE_WEIGHTS, MODES, strict=True))
    p = mix / mix.sum()
    return p.log().float()


class QuadraticLogitStudent(nn.Module):
    """A two-parameter exponential-family student: logits_v = a·u + b·u², u = (v − 9.5) / 9.5 ∈ [−1, 1].

    With b < 0 it is a discretised Gaussian with μ = 9.5 − 9.5·a / (2b) and σ² = −9.5² / (2b); no (a, b) puts
    two separate peaks at tokens 4 and 15, so the family cannot match the teacher and must choose between
    covering both modes and sitting on one."""

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__()
        b = -(9.5**2) / (2 * sigma**2)
        self.a = nn.Parameter(torch.tensor(-2 * b * (mu - 9.5) / 9.5))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self) -> Tensor:
        u = (torch.arange(VOCAB, dtype=torch.float32) - 9.5) / 9.5
        return self.a * u + self.b * u**2

    def mean_and_std(self) -> tuple[float, float]:
        """Mean and standard deviation (in tokens) of the student's distribution."""
        with torch.no_grad():
            q = torch.softmax(self(), -1)
            v = torch.arange(VOCAB, dtype=torch.float32)
            mean = float((q * v).sum())
            return mean, float((q * (v - mean) ** 2).sum().sqrt())


def make_loss(name: str) -> tuple[Callable[[Tensor, Tensor], Tensor], TAID | None]:
    """The training loss `name` as potstill gives it, and the TAID object to step (None for the others)."""
    if name == "fkl":
        return forward_kl, None
    if name == "rkl":
        return reverse_kl, None
    taid = TAID(t_start=0.4, alpha=5e-4, beta=0.99)
    return taid, taid


def mode_masses(probs: Tensor) -> dict[str, float]:
    """Mass within ±2 tokens of each mode and in the valley (tokens 8–11) of a [VOCAB] distribution."""
    return {"mass_A": float(probs[MODES[0] - 2:MODES[0] + 3].sum()),
            "mass_B": float(probs[MODES[1] - 2:MODES[1] + 3].sum()),
            "valley": float(probs[8:12].sum())}


def train_toy(loss_name: str, seed: int, steps: int, lr: float = 0.05) -> dict[str, float]:
    """Fit the Gaussian-shape student to the bimodal teacher with one loss; its masses and divergences after."""
    teacher = bimodal_teacher_logits()
    mu0 = 8.0 + 0.3 * float(torch.randn((), generator=torch.Generator().manual_seed(seed)))
    student = QuadraticLogitStudent(mu0, 2.0)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    loss_fn, taid = make_loss(loss_name)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_fn(student()[None], teacher[None])
        loss.backward()
        opt.step()
        if taid is not None:
            taid.on_optimizer_step(loss.item(), step, steps)
    with torch.no_grad():
        logits = student()
        out = mode_masses(torch.softmax(logits, -1))
        out["fkl"] = float(forward_kl(logits[None], teacher[None]))
        out["rkl"] = float(reverse_kl(logits[None], teacher[None]))
        out["mean"], out["std"] = student.mean_and_std()
    return out


def collapsed(row: dict[str, float]) -> bool:
    """One mode holds < 5 % of the student's mass (the teacher puts ≥ 35 % near each)."""
    return min(row["mass_A"], row["mass_B"]) < 0.05


def mlp(width: int, in_dim: int = 16, out_dim: int = 64, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class ScaledTeacher(nn.Module):
    """A frozen network whose logits are standardised and multiplied by `scale`."""

    def __init__(self, net: nn.Module, std: float, scale: float) -> None:
        super().__init__()
        self.net, self.std, self.scale = net, std, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * (self.scale / self.std)


def ladder_teacher(target_entropy: float = 1.5) -> nn.Module:
    """The fixed random teacher MLP, its logit scale set (by bisection) to a mean entropy of `target_entropy`."""
    torch.manual_seed(1234)
    net = mlp(256).requires_grad_(False)
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        raw = net(x)
        std = float(raw.std())
        lo, hi = 0.1, 50.0
        for _ in range(40):
            mid = (lo + hi) / 2
            p = torch.softmax(raw * (mid / std), -1)
            entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
            lo, hi = (mid, hi) if entropy > target_entropy else (lo, mid)
    return ScaledTeacher(net, std, (lo + hi) / 2).eval()


def train_ladder(teacher: nn.Module, width: int, loss_name: str, seed: int, steps: int,
                 eval_x: Tensor, eval_t: Tensor, lr: float = 3e-3, batch: int = 256) -> dict[str, float]:
    torch.manual_seed(seed)
    student = mlp(width)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    loss_fn, taid = make_loss(loss_name)
    data = torch.Generator().manual_seed(10_000 + seed)
    for step in range(1, steps + 1):
        x = torch.randn(batch, 16, generator=data)
        with torch.no_grad():
            t_logits = teacher(x)
        opt.zero_grad()
        loss = loss_fn(student(x), t_logits)
        loss.backward()
        opt.step()
        if taid is not None:
            taid.on_optimizer_step(loss.item(), step, steps)
    with torch.no_grad():
        s_logits = student(eval_x)
        return {"kl": float(forward_kl(s_logits, eval_t)),
                "agree": float((s_logits.argmax(-1) == eval_t.argmax(-1)).float().mean())}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def run_toy(seeds: list[int], steps: int) -> dict[str, list[dict[str, float]]]:
    results = {name: [train_toy(name, s, steps) for s in seeds] for name in LOSSES}
    teacher = mode_masses(bimodal_teacher_logits().exp())
    print(f"\nPart 1: bimodal toy, unimodal 2-parameter student, {steps} Adam steps, seeds {seeds}")
    print(f"teacher: mass_A {teacher['mass_A']:.3f}  mass_B {teacher['mass_B']:.3f}  valley {teacher['valley']:.4f}")
    header = f"{'loss':6} {'mass_A':>17} {'mass_B':>17} {'valley':>17} {'FKL to teacher':>17} " \
             f"{'RKL to teacher':>17} {'mean':>6} {'std':>5} collapsed"
    print(header)
    for name, rows in results.items():
        cells = [mean_std([r[k] for r in rows]) for k in ("mass_A", "mass_B", "valley", "fkl", "rkl")]
        mu = statistics.fmean(r["mean"] for r in rows)
        sigma = statistics.fmean(r["std"] for r in rows)
        n_collapsed = sum(collapsed(r) for r in rows)
        print(f"{name:6} " + " ".join(f"{c:>17}" for c in cells) + f" {mu:6.2f} {sigma:5.2f} "
              f"{n_collapsed}/{len(rows)}")
    return results


def run_ladder(seeds: list[int], widths: list[int], steps: int) -> dict[tuple[int, str], list[dict[str, float]]]:
    teacher = ladder_teacher()
    eval_x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eval_t = teacher(eval_x)
        p = torch.softmax(eval_t, -1)
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    results = {(w, name): [train_ladder(teacher, w, name, s, steps, eval_x, eval_t) for s in seeds]
               for w in widths for name in LOSSES}
    print(f"\nPart 2: capacity ladder, teacher MLP 16-256-256-64 (mean entropy {entropy:.2f} nats), "
          f"{steps} steps × 256, seeds {seeds}")
    print(f"{'width':>5} {'params':>7} {'KL FKL':>17} {'KL RKL':>17} {'KL TAID':>17} {'TAID gain':>10} "
          f"{'agree FKL':>10} {'agree RKL':>10} {'agree TAID':>10}")
    for w in widths:
        kl = {n: [r["kl"] for r in results[(w, n)]] for n in LOSSES}
        agree = {n: statistics.fmean(r["agree"] for r in results[(w, n)]) for n in LOSSES}
        gain = (statistics.fmean(kl["fkl"]) - statistics.fmean(kl["taid"])) / statistics.fmean(kl["fkl"])
        params = sum(p.numel() for p in mlp(w).parameters())
        print(f"{w:5d} {params:7d} {mean_std(kl['fkl']):>17} {mean_std(kl['rkl']):>17} {mean_std(kl['taid']):>17} "
              f"{gain:+10.1%} {agree['fkl']:10.3f} {agree['rkl']:10.3f} {agree['taid']:10.3f}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 widths, few steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 32, 8, 4, 2])
    p.add_argument("--steps", type=int, default=1500, help="ladder steps per run")
    p.add_argument("--toy-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the means as JSON (reproduce.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.widths, args.steps, args.toy_steps = [0], [16, 2], 10, 100
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    toy = run_toy(args.seeds, args.toy_steps)
    ladder = run_ladder(args.seeds, args.widths, args.steps)
    if args.json:
        atomic_write_json(args.json, {
            "seeds": args.seeds,
            "toy": {name: {k: statistics.fmean(r[k] for r in rows) for k in rows[0]} for name, rows in toy.items()},
            "ladder": {str(w): {name: {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
                                for (width, name), rows in ladder.items() if width == w} for w in args.widths},
        })
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
