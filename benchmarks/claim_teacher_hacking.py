"""Claim check (issue #16 §3): teacher hacking (Tiapkin et al. 2025) in an oracle → teacher → student chain.

The paper: distilling for many epochs on a fixed offline set of teacher completions keeps bringing the student
closer to the teacher (proxy) while it drifts away from the true distribution (golden); more distinct prompts, or
fresh (online) generations, delay or prevent it. Here the whole chain is small and exact:

- oracle: a random trigram language model over V = 32 tokens, P(x_t | x_{t−2}, x_{t−1}) = softmax(e_a·A + e_b·B
  + g(a, b)) with random low-rank embeddings plus a smaller random term per context (seed 0);
- teacher: a count-based trigram fitted on `--teacher-samples` oracle sequences (add-0.1 smoothing, backed off to
  the bigram counts): close to the oracle where contexts are frequent, wrong where they are rare;
- student: a small neural trigram (embeddings 2×16 → MLP 64 → V), trained with potstill's `forward_kl`
  (token-level KL(teacher ‖ student) on every position of the training sequences), Adam, batch 32 sequences.

Data regimes, all for the same `--steps` steps:
- `offline`: `--prompts` prompts (two oracle tokens each) × 1 teacher completion, fixed, reused every epoch;
- `offline×10`: ten times more distinct prompts, still fixed (more diverse offline data);
- `online`: fresh prompts and fresh teacher completions every step;
- `on-policy`: fresh prompts, completions sampled from the student itself (teacher logits on them).

Every `--eval-every` steps, on 256 held-out prompts with oracle completions: proxy = mean KL(teacher ‖ student) per
token, golden = mean KL(oracle ‖ student) per token. Each evaluation also goes, as the Distiller would send it, to
potstill's `TeacherHackingWatch` callback (`potstill.train.callbacks`, which feeds `TeacherHackingMonitor`):
`kl_to_teacher` = proxy and `nll` = the student's NLL of the oracle's next token (= golden + the oracle's entropy).
A second `TeacherHackingMonitor` gets the paper's golden metric itself (KL to the oracle) in place of the NLL.
Reported: the turn (the step at which golden was lowest), golden at its minimum and at the end, golden's rise and
the proxy's change from the turn to the end, "hacked" (golden ended > 2 % above its minimum while the proxy
fell), and per seed the first warning step of the callback (`watch`) and of the KL-fed monitor (`monitor`).
Mean ± std over `--seeds` (student init and data order; the oracle and teacher are fixed).

Usage: python benchmarks/claim_teacher_hacking.py [--quick] [--seeds 0 1 2] [--steps 3000] [--prompts 64]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from potstill.eval.teacher_hacking import TeacherHackingMonitor
from potstill.io import atomic_write_json
from potstill.losses import forward_kl
from potstill.train.callbacks import FitState, MetricsLog, TeacherHackingWatch

V = 32
LENGTH = 24  # tokens per sequence, the 2 prompt tokens included
BATCH = 32
REGIMES = ("offline", "offline×10", "online", "on-policy")


class TrigramTable:
    """A trigram LM given by a [V, V, V] table of next-token log-probabilities (context a, b → next)."""

    def __init__(self, log_probs: Tensor) -> None:
        self.log_probs = log_probs

    def logits(self, seqs: Tensor) -> Tensor:
        """Next-token log-probabilities at positions 2.. of [N, L] sequences: [N, L − 2, V]."""
        return self.log_probs[seqs[:, :-2], seqs[:, 1:-1]]

    def sample(self, prompts: Tensor, length: int, generator: torch.Generator) -> Tensor:
        seqs = prompts
        while seqs.shape[1] < length:
            probs = self.log_probs[seqs[:, -2], seqs[:, -1]].exp()
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=generator)], 1)
        return seqs


def make_oracle(rank: int = 6, scale: float = 2.5, noise: float = 1.0) -> TrigramTable:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(V, rank, generator=g), torch.randn(V, rank, generator=g)
    out_a, out_b = torch.randn(rank, V, generator=g), torch.randn(rank, V, generator=g)
    logits = (a @ out_a)[:, None, :] + (b @ out_b)[None, :, :]
    logits = scale * logits / logits.std() + noise * torch.randn(V, V, V, generator=g)
    return TrigramTable(torch.log_softmax(logits, -1))


def oracle_prompts(oracle: TrigramTable, n: int, generator: torch.Generator) -> Tensor:
    """Two-token prompts: a uniform first token and the oracle's continuation of it from a random context."""
    first = torch.randint(0, V, (n, 2), generator=generator)
    return oracle.sample(first, 4, generator)[:, 2:]


def fit_teacher(oracle: TrigramTable, samples: int, smoothing: float = 0.1) -> TrigramTable:
    g = torch.Generator().manual_seed(1)
    seqs = oracle.sample(oracle_prompts(oracle, samples, g), LENGTH, g)
    tri = torch.zeros(V, V, V)
    bi = torch.zeros(V, V)
    a, b, c = seqs[:, :-2].reshape(-1), seqs[:, 1:-1].reshape(-1), seqs[:, 2:].reshape(-1)
    tri.index_put_((a, b, c), torch.ones_like(c, dtype=torch.float32), accumulate=True)
    bi.index_put_((b, c), torch.ones_like(c, dtype=torch.float32), accumulate=True)
    backoff = (bi + smoothing) / (bi + smoothing).sum(-1, keepdim=True)
    probs = (tri + smoothing * V * backoff[None]) / (tri.sum(-1, keepdim=True) + smoothing * V)
    return TrigramTable(probs.log())


class NeuralTrigram(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.emb_a, self.emb_b = nn.Embedding(V, dim), nn.Embedding(V, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, V))

    def forward(self, seqs: Tensor) -> Tensor:
        """Next-token logits at positions 2.. of [N, L] sequences: [N, L − 2, V]."""
        return self.mlp(torch.cat([self.emb_a(seqs[:, :-2]), self.emb_b(seqs[:, 1:-1])], -1))

    @torch.no_grad()
    def sample(self, prompts: Tensor, length: int, generator: torch.Generator) -> Tensor:
        seqs = prompts
        while seqs.shape[1] < length:
            last = self.mlp(torch.cat([self.emb_a(seqs[:, -2]), self.emb_b(seqs[:, -1])], -1))
            seqs = torch.cat([seqs, torch.multinomial(torch.softmax(last, -1), 1, generator=generator)], 1)
        return seqs


def train(regime: str, seed: int, steps: int, prompts: int, eval_every: int, oracle: TrigramTable,
          teacher: TrigramTable, held_out: Tensor, run_dir: Path) -> dict[str, float]:
    torch.manual_seed(seed)
    student = NeuralTrigram()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(100 + seed)
    fixed = None
    if regime.startswith("offline"):
        n = prompts * (10 if regime == "offline×10" else 1)
        fixed = teacher.sample(oracle_prompts(oracle, n, data), LENGTH, data)
    epoch_rows = len(fixed) if fixed is not None else steps * BATCH
    watch = TeacherHackingWatch(MetricsLog(run_dir, is_main=True, log_every=eval_every))
    state = FitState(run_dir=run_dir, is_main=True, start=0, total=steps, rows_per_step=BATCH, epoch_rows=epoch_rows)
    oracle_logits, teacher_logits = oracle.logits(held_out), teacher.logits(held_out)
    targets = held_out[:, 2:]
    monitor = TeacherHackingMonitor()  # the same monitor, given the paper's golden metric (KL to the oracle)
    curve: list[tuple[int, float, float]] = []
    first_warning: dict[str, float] = {"watch": math.nan, "monitor": math.nan}
    for step in range(1, steps + 1):
        if fixed is not None:
            idx = torch.randint(0, len(fixed), (BATCH,), generator=data)
            seqs = fixed[idx]
        elif regime == "online":
            seqs = teacher.sample(oracle_prompts(oracle, BATCH, data), LENGTH, data)
        else:
            seqs = student.sample(oracle_prompts(oracle, BATCH, data), LENGTH, data)
        opt.zero_grad()
        forward_kl(student(seqs), teacher.logits(seqs)).backward()
        opt.step()
        if step % eval_every == 0:
            with torch.no_grad():
                s_logits = student(held_out)
                proxy = float(forward_kl(s_logits, teacher_logits))
                golden = float(forward_kl(s_logits, oracle_logits))
                nll = float(nn.functional.cross_entropy(s_logits.reshape(-1, V), targets.reshape(-1)))
            curve.append((step, proxy, golden))
            watch.on_evaluate(state, step, {"kl_to_teacher": proxy, "nll": nll})
            monitor.update(step, proxy, golden)
            for name, m in (("watch", watch.monitor), ("monitor", monitor)):
                if m.warnings and math.isnan(first_warning[name]):
                    first_warning[name] = float(step)
    best_step, best_proxy, best_golden = min(curve, key=lambda c: c[2])
    _, end_proxy, end_golden = curve[-1]
    return {"best_step": best_step, "golden_min": best_golden, "golden_end": end_golden,
            "proxy_at_min": best_proxy, "proxy_end": end_proxy,
            "golden_rise": end_golden / best_golden - 1, "proxy_change": end_proxy / best_proxy - 1,
            "hacked": float(end_golden > 1.02 * best_golden and end_proxy < best_proxy),
            "warn_watch": first_warning["watch"], "warn_monitor": first_warning["monitor"],
            "epochs": steps * BATCH / epoch_rows if fixed is not None else 0.0}


def mean_std(values: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def percent(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):+.1f} ± {100 * sd:.1f} %"


def warn_steps(values: list[float]) -> str:
    """First warning step of each seed, '-' where none came."""
    return ",".join("-" if math.isnan(v) else f"{v:.0f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 60 steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--teacher-samples", type=int, default=2000)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON (reproduce.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = [0], 60, 20
    torch.set_num_threads(1)
    started = time.perf_counter()
    oracle = make_oracle()
    teacher = fit_teacher(oracle, args.teacher_samples)
    g = torch.Generator().manual_seed(2)
    held_out = oracle.sample(oracle_prompts(oracle, 256, g), LENGTH, g)
    teacher_golden = float(forward_kl(teacher.logits(held_out), oracle.logits(held_out)))
    oracle_log_probs = oracle.logits(held_out)
    oracle_entropy = float(-(oracle_log_probs.exp() * oracle_log_probs).sum(-1).mean())
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for regime in REGIMES:
            for seed in args.seeds:
                run_dir = Path(tmp) / f"{regime}-{seed}"
                run_dir.mkdir()
                results.setdefault(regime, []).append(
                    train(regime, seed, args.steps, args.prompts, args.eval_every, oracle, teacher, held_out, run_dir))
    print(f"\nTeacher hacking: trigram oracle (V={V}) → count teacher ({args.teacher_samples} oracle sequences, "
          f"KL(oracle ‖ teacher) = {teacher_golden:.4f}/token) → neural-trigram student; oracle entropy "
          f"{oracle_entropy:.3f} nats/token; {args.steps} steps × "
          f"{BATCH} sequences of {LENGTH}; {args.prompts} offline prompts; seeds {args.seeds}")
    print(f"{'regime':11} {'epochs':>6} {'turn (golden min)':>17} {'golden min':>17} {'golden end':>17} "
          f"{'golden rise':>15} {'proxy after turn':>16} {'hacked':>6} {'watch warns':>13} {'monitor warns':>13}")
    for regime, rows in results.items():
        col = {k: [r[k] for r in rows] for k in rows[0]}
        print(f"{regime:11} {statistics.fmean(col['epochs']):6.0f} {mean_std(col['best_step'], 0):>17} "
              f"{mean_std(col['golden_min']):>17} {mean_std(col['golden_end']):>17} "
              f"{percent(col['golden_rise']):>15} {percent(col['proxy_change']):>16} "
              f"{int(sum(col['hacked']))}/{len(rows):<4} {warn_steps(col['warn_watch']):>13} "
              f"{warn_steps(col['warn_monitor']):>13}")
    if args.json:  # per seed: a warning step is null where none came
        atomic_write_json(args.json, {
            "seeds": args.seeds, "teacher_golden": teacher_golden,
            "regimes": {regime: {k: [None if math.isnan(r[k]) else r[k] for r in rows] for k in rows[0]}
                        for regime, rows in results.items()},
        })
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
