"""Data strategies of issue #6 §5 on small CPU tasks: RAD active selection, pruning + KD, DDK domain weights.

(a) Robust Active Distillation (`potstill.data.active`). A 2-D, 2-class Gaussian mixture: a 3 × 3
    checkerboard of blobs 2 apart, σ = 0.6 (Bayes accuracy ≈ 0.88). The teacher knows the exact Bayes
    posterior but is wrong where it is unsure: with probability 0.45 · (1 − |2p* − 1|)² its soft label is a
    confident (0.95) vote for the wrong class, else a confident vote for the right one. Student: MLP 2→16→2
    (tanh), retrained from scratch after each round on 30 gold-labelled seed points (CE) + the queried points
    (soft CE on the teacher's labels), 250 full-batch Adam steps. 6 rounds × 25 queries from a pool of 2,000.
    Compared at equal teacher queries (150): `random`, `margin` (top-b by 1 − margin, i.e. RAD with ε = 0),
    `rad` (ε = the teacher's error rate measured on the 30 seed points) and `rad@0.2` / `rad@0.4` (ε given).
    Reported: test accuracy (2,000 fresh points, true labels) and the share of queried teacher labels that
    are wrong.
(b) Pruning + KD (`potstill.data.pruning`) on the digits (sklearn `load_digits`, builtin 70/10/20 split):
    teacher `potstill.examples.digits:trained_teacher` (2 × 256, trained on 100 % of the train split); a
    student MLP 64→32→10 trained on a random 10 / 30 / 100 % of the train split with
    (1 − α)·CE + α·τ²·KL, τ = 4, α ∈ {0, 0.5, 0.9, α(f)} (α(f) = `kd_weight_for_fraction`), 800 Adam steps
    (lr 3e-3) of batch 64 drawn from the kept records, whatever f. Reported: test accuracy, and the KD gain
    over α = 0 per kept fraction.
(c) DDK (`potstill.data.ddk`): 3 synthetic domains over a 12-token vocabulary, each a bigram
    chain (a near-deterministic cycle on tokens 0–7; a Dirichlet(0.5) table on all tokens; a sparse
    Dirichlet(0.1) table on tokens 4–11), 200 / 200 / 60 training sequences of 33 tokens, 50 validation
    sequences per domain. Teacher = the exact tables; student = one shared embedding(12, 8) → linear(8, 12)
    bigram model (no domain input), trained with KL(p_T ‖ p_S) per position, Adam 1e-2, 1,200 steps of 16
    sequences (equal tokens for every method). Compared: `mix` (records uniformly, i.e. the natural domain
    mix), `uniform` (each domain 1/3) and `ddk` (DomainWeightedSampler, α = 0.5, an update every K = 50
    steps from the validation perplexities). Reported: the largest per-domain ℓ_S/ℓ_T (validation perplexity
    ratio) at the end, its mean over the 24 evaluations, and the final weights.

Every number comes from this run; seeds vary data, initialisation and sampling. No timing is asserted.

Usage: python benchmarks/data_strategies.py [--only a b c] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


# ---------------------------------------------------------------------------------------------- (a) RAD
BLOBS = np.array([[a, b] for a in (-2.0, 0.0, 2.0) for b in (-2.0, 0.0, 2.0)])
BLOB_CLASS = np.array([(i + j) % 2 for i in range(3) for j in range(3)])
SIGMA = 0.6


def mixture(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    blob = rng.integers(0, len(BLOBS), n)
    return BLOBS[blob] + rng.normal(size=(n, 2)) * SIGMA, BLOB_CLASS[blob]


def bayes_posterior(x: np.ndarray) -> np.ndarray:
    """p*(y = 1 | x) of the equal-weight blobs."""
    d2 = ((x[:, None, :] - BLOBS[None]) ** 2).sum(-1)
    dens = np.exp(-d2 / (2 * SIGMA**2))
    return dens[:, BLOB_CLASS == 1].sum(1) / dens.sum(1)


def noisy_teacher(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Soft labels (n, 2) and whether each is wrong: errors concentrated where the posterior is unsure."""
    post = bayes_posterior(x)
    right = (post > 0.5).astype(int)
    error_prob = 0.45 * (1 - np.abs(2 * post - 1)) ** 2
    wrong = rng.random(x.shape[0]) < error_prob
    vote = np.where(wrong, 1 - right, right)
    soft = np.full((x.shape[0], 2), 0.05)
    soft[np.arange(x.shape[0]), vote] = 0.95
    return soft, wrong


def train_mlp(x: np.ndarray, gold: np.ndarray, xq: np.ndarray, soft: np.ndarray, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(gold)
    xq_t, soft_t = torch.tensor(xq, dtype=torch.float32), torch.tensor(soft, dtype=torch.float32)
    for _ in range(250):
        opt.zero_grad()
        loss = F.cross_entropy(model(xs), ys) * xs.shape[0]
        if xq_t.shape[0]:
            loss = loss - (soft_t * F.log_softmax(model(xq_t), -1)).sum()
        (loss / (xs.shape[0] + xq_t.shape[0])).backward()
        opt.step()
    return model


def run_rad(seed: int, method: str) -> tuple[float, float]:
    from potstill.data.active import ActiveSelector

    rng = np.random.default_rng(seed)
    pool_x, _ = mixture(2000, rng)
    test_x, test_y = mixture(2000, rng)
    seed_x, seed_y = mixture(30, rng)
    teacher_soft, teacher_wrong = noisy_teacher(pool_x, rng)
    seed_soft, _ = noisy_teacher(seed_x, rng)
    if method == "rad":
        error_rate = float(np.mean(seed_soft.argmax(1) != seed_y))
    else:
        error_rate = float(method.split("@")[1]) if "@" in method else 0.0
    selector = ActiveSelector(150, teacher_error_rate=error_rate, seed=seed)
    queried = np.zeros(0, dtype=np.int64)
    model = train_mlp(seed_x, seed_y, pool_x[:0], teacher_soft[:0], seed)
    pick_rng = np.random.default_rng(seed + 1000)
    for _ in range(6):
        if method == "random":
            free = np.setdiff1d(np.arange(pool_x.shape[0]), queried)
            new = pick_rng.choice(free, size=25, replace=False)
        else:
            with torch.no_grad():
                probs = F.softmax(model(torch.tensor(pool_x, dtype=torch.float32)), -1).numpy()
            new = selector.select(probs, count=25)
        queried = np.union1d(queried, new)
        model = train_mlp(seed_x, seed_y, pool_x[queried], teacher_soft[queried], seed)
    with torch.no_grad():
        acc = float((model(torch.tensor(test_x, dtype=torch.float32)).argmax(1).numpy() == test_y).mean())
    return acc, float(teacher_wrong[queried].mean())


def part_a(seeds: list[int]) -> dict[str, dict[str, float]]:
    print("\n(a) Robust Active Distillation: 2-D 3×3 checkerboard of Gaussians, 150 teacher queries (6 rounds × 25)")
    rng = np.random.default_rng(123)
    x, y = mixture(20000, rng)
    _, wrong = noisy_teacher(x, rng)
    bayes = float(np.mean((bayes_posterior(x) > 0.5) == y))
    print(f"Bayes accuracy {bayes:.3f}; teacher soft-label error rate on the pool distribution: {wrong.mean():.3f}")
    print(f"{'method':<8} {'test accuracy':>18} {'wrong queried labels':>22}   per seed accuracy")
    table = {}
    for method in ("random", "margin", "rad", "rad@0.2", "rad@0.4"):
        accs, wrongs = [], []
        for s in seeds:
            a, w = run_rad(s, method)
            accs.append(a)
            wrongs.append(w)
        print(f"{method:<8} {mean_std(accs):>18} {mean_std(wrongs):>22}   " + " ".join(f"{a:.3f}" for a in accs))
        table[method] = {"accuracy": statistics.mean(accs), "wrong_queried": statistics.mean(wrongs)}
    return table


# ---------------------------------------------------------------------------------------------- (b) pruning + KD
def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from potstill.data import builtin_records

    records = builtin_records("digits", split)
    return (torch.tensor([r["features"] for r in records], dtype=torch.float32),
            torch.tensor([r["label"] for r in records]))


def part_b(seeds: list[int]) -> dict[str, dict[str, float]]:
    from potstill.data.pruning import kd_weight_for_fraction, prune_indices, pruned_kd_loss
    from potstill.examples.digits import mlp, trained_teacher

    x, y = digits_tensors("train")
    xt, yt = digits_tensors("test")
    teacher = trained_teacher()
    with torch.no_grad():
        teacher_logits = teacher(x)
        teacher_acc = float((teacher(xt).argmax(1) == yt).float().mean())
    print(f"\n(b) Pruning + KD on digits: {len(x)} train / {len(xt)} test images; teacher 2×256 on 100 %: "
          f"test accuracy {teacher_acc:.4f}; student 64→32→10, τ = 4, 800 steps of batch 64")
    fractions = (0.1, 0.3, 1.0)
    header = f"{'kept':>6} {'n':>5}  " + "  ".join(f"{name:>17}" for name in ("α=0", "α=0.5", "α=0.9", "α(f)"))
    print(header + f"  {'α(f)':>5}  {'best α':>6}  {'gain best':>9}  {'gain α(f)':>9}")
    table = {}
    for f in fractions:
        alpha_f = kd_weight_for_fraction(f)
        results: dict[str, list[float]] = {}
        for name, alpha in (("α=0", 0.0), ("α=0.5", 0.5), ("α=0.9", 0.9), ("α(f)", alpha_f)):
            accs = []
            for s in seeds:
                keep = torch.as_tensor(prune_indices(len(x), f, seed=s))
                student = mlp(hidden=32, seed=s)
                opt = torch.optim.Adam(student.parameters(), lr=3e-3)
                g = torch.Generator().manual_seed(s)
                for _ in range(800):
                    idx = keep[torch.randint(0, keep.numel(), (64,), generator=g)]
                    opt.zero_grad()
                    pruned_kd_loss(student(x[idx]), teacher_logits[idx], y[idx], f, 4.0, alpha=alpha).backward()
                    opt.step()
                with torch.no_grad():
                    accs.append(float((student(xt).argmax(1) == yt).float().mean()))
            results[name] = accs
        means = {k: statistics.mean(v) for k, v in results.items()}
        best = max(("α=0.5", "α=0.9", "α(f)"), key=lambda k: means[k])
        print(f"{f:>6.0%} {int(keep.numel()):>5}  " + "  ".join(f"{mean_std(results[k]):>17}" for k in results)
              + f"  {alpha_f:>5.2f}  {best:>6}  {means[best] - means['α=0']:>+9.4f}  "
              f"{means['α(f)'] - means['α=0']:>+9.4f}")
        table[f"{f:.0%}"] = means
    return table


# ---------------------------------------------------------------------------------------------- (c) DDK
VOCAB, SEQ = 12, 33


def domain_tables(rng: np.random.Generator) -> list[np.ndarray]:
    tables = []
    cycle = np.full((VOCAB, VOCAB), 1e-3)
    for a in range(VOCAB):
        cycle[a, (a + 1) % 8 if a < 8 else a % 8] = 1.0
    tables.append(cycle / cycle.sum(1, keepdims=True))
    tables.append(rng.dirichlet(np.full(VOCAB, 0.5), size=VOCAB))
    sparse = np.full((VOCAB, VOCAB), 1e-4)
    sparse[:, 4:] += rng.dirichlet(np.full(8, 0.1), size=VOCAB)
    tables.append(sparse / sparse.sum(1, keepdims=True))
    return tables


def sample_chains(table: np.ndarray, n: int, rng: np.random.Generator, support: range) -> np.ndarray:
    seqs = np.zeros((n, SEQ), dtype=np.int64)
    seqs[:, 0] = rng.choice(list(support), size=n)
    cum = np.cumsum(table, axis=1)
    for t in range(1, SEQ):
        u = rng.random(n)[:, None]
        seqs[:, t] = np.minimum((u > cum[seqs[:, t - 1]]).sum(1), VOCAB - 1)
    return seqs


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


def run_ddk(seed: int, method: str) -> tuple[float, float, list[float]]:
    from potstill.data.ddk import DomainWeightedSampler
    from potstill.losses import forward_kl

    rng = np.random.default_rng(seed)
    tables = domain_tables(rng)
    supports = (range(0, 8), range(0, VOCAB), range(4, VOCAB))
    sizes = (200, 200, 60)
    train = [sample_chains(t, n, rng, s) for t, n, s in zip(tables, sizes, supports, strict=True)]
    valid = [sample_chains(t, 50, rng, s) for t, s in zip(tables, supports, strict=True)]
    records = np.concatenate(train)
    domains = [d for d, n in enumerate(sizes) for _ in range(n)]
    log_tables = [torch.tensor(np.log(t), dtype=torch.float32) for t in tables]
    record_tables = torch.stack([log_tables[d] for d in range(3)])
    dom_t = torch.tensor(domains)
    rec_t = torch.tensor(records)

    torch.manual_seed(seed)
    model = Bigram()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    smoothing = 0.0 if method == "uniform" else 0.5
    sampler = DomainWeightedSampler(domains, batch_size=16, smoothing=smoothing, seed=seed)
    mix_rng = np.random.default_rng(seed + 7)

    def validation() -> tuple[dict[int, float], dict[int, float]]:
        s_loss, t_loss = {}, {}
        with torch.no_grad():
            for d, seqs in enumerate(valid):
                v = torch.tensor(seqs)
                prev, nxt = v[:, :-1], v[:, 1:]
                s_loss[d] = float(F.cross_entropy(model(prev).reshape(-1, VOCAB), nxt.reshape(-1)))
                t_loss[d] = float(-log_tables[d][prev, nxt].mean())
        return s_loss, t_loss

    max_ratios = []
    for step in range(1200):
        if step % 50 == 0:
            s_loss, t_loss = validation()
            ratios = sampler.ratios(s_loss, t_loss)
            max_ratios.append(float(ratios.max()))
            if method == "ddk" and step > 0:
                sampler.update(s_loss, t_loss)
        if method == "mix":
            batch = torch.as_tensor(mix_rng.integers(0, len(records), 16))
        else:
            batch = torch.tensor(sampler.next_batch())
        seqs, doms = rec_t[batch], dom_t[batch]
        prev = seqs[:, :-1]
        teacher = record_tables[doms[:, None], prev]  # (B, L, V) log-probs of the exact table rows
        opt.zero_grad()
        forward_kl(model(prev), teacher).backward()
        opt.step()
    s_loss, t_loss = validation()
    final = float(sampler.ratios(s_loss, t_loss).max())
    max_ratios.append(final)
    weights = sampler.weights.tolist() if method != "mix" else [n / sum(sizes) for n in sizes]
    return final, statistics.mean(max_ratios), weights


def part_c(seeds: list[int]) -> dict[str, dict[str, float]]:
    print("\n(c) DDK: 3 bigram domains (cycle / Dirichlet 0.5 / sparse 0.1), shared bigram student, KL to the exact "
          "tables; 1,200 steps × 16 sequences each")
    print(f"{'method':<8} {'final max ℓS/ℓT':>18} {'mean max ℓS/ℓT':>18}   final weights (cycle, dense, sparse), "
          "seed 0")
    table = {}
    for method in ("mix", "uniform", "ddk"):
        finals, means, weights = [], [], None
        for s in seeds:
            f, m, w = run_ddk(s, method)
            finals.append(f)
            means.append(m)
            weights = weights or w
        print(f"{method:<8} {mean_std(finals):>18} {mean_std(means):>18}   "
              + ", ".join(f"{w:.3f}" for w in weights))
        table[method] = {"final": statistics.mean(finals), "mean": statistics.mean(means)}
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the means as JSON (reproduce.py)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"data strategies benchmark; seeds {args.seeds}; torch {torch.__version__}, 1 thread")
    tables = {}
    for part in args.only:
        t0 = time.perf_counter()
        tables[part] = {"a": part_a, "b": part_b, "c": part_c}[part](args.seeds)
        print(f"[{part}: {time.perf_counter() - t0:.1f} s]")
    if args.json:
        from potstill.io import atomic_write_json

        atomic_write_json(args.json, {"seeds": args.seeds, **tables})
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
